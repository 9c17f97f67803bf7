"""The z-step (Eq. 9) for every supported activation, against a brute-force 1-D grid search."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.solvers.activations import ACTIVATIONS, PIECEWISE_LINEAR, activation_derivative, apply_activation
from onnx_lowrank.solvers.nonlinear import fit_nonlinear
from onnx_lowrank.solvers.zstep import z_update

PARAMS = {"clip": {"min": 0.0, "max": 6.0}, "leaky_relu": {"alpha": 0.1},
          "hard_sigmoid": {"alpha": 0.2, "beta": 0.5}, "gelu": {}}
GRID = np.linspace(-12, 12, 96001)


def cost(kind, t, p, z, lam):
    return (t - apply_activation(kind, PARAMS.get(kind, {}), z)) ** 2 + lam * (z - p) ** 2


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("lam", [0.01, 1.0])
def test_z_step_reaches_the_brute_force_minimum(kind: str, lam: float) -> None:
    rng = np.random.default_rng(0)
    params = PARAMS.get(kind, {})
    target = apply_activation(kind, params, 3 * rng.standard_normal(200))
    prediction = 3 * rng.standard_normal(200)
    z = z_update(kind, params, target, prediction, lam)
    found = cost(kind, target, prediction, z, lam)
    best = np.array([cost(kind, t, p, GRID, lam).min() for t, p in zip(target, prediction)])
    # Exact for piecewise-linear activations; the 1-D Newton solve may stop near the optimum otherwise.
    slack = 1e-6 if kind in PIECEWISE_LINEAR else 1e-3 * (1 + best)
    assert np.all(found <= best + slack)


@pytest.mark.parametrize("kind", ["silu", "gelu", "tanh", "hard_swish", "sigmoid"])
def test_smooth_z_step_never_worse_than_the_previous_z(kind: str) -> None:
    rng = np.random.default_rng(1)
    target = apply_activation(kind, {}, rng.standard_normal(500))
    prediction = rng.standard_normal(500)
    previous = rng.standard_normal(500)
    z = z_update(kind, {}, target, prediction, 0.5, previous)
    assert np.all(cost(kind, target, prediction, z, 0.5) <= cost(kind, target, prediction, previous, 0.5))


@pytest.mark.parametrize("kind", ["silu", "gelu", "tanh", "hard_swish", "sigmoid", "leaky_relu", "hard_sigmoid"])
def test_derivative_matches_finite_differences(kind: str) -> None:
    x = np.linspace(-5, 5, 1001) + 1e-3  # away from the kinks
    params = PARAMS.get(kind, {})
    numeric = (apply_activation(kind, params, x + 1e-6) - apply_activation(kind, params, x - 1e-6)) / 2e-6
    np.testing.assert_allclose(activation_derivative(kind, params, x), numeric, atol=1e-5)


def planted_layer(kind: str, n: int = 5000, d: int = 24, rank: int = 5, seed: int = 3):
    """Low-rank pre-activations plus noise that the activation mostly squashes."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    y = (rng.standard_normal((n, rank)) * 2.5) @ basis.T
    squashed = np.abs(activation_derivative(kind, PARAMS.get(kind, {}), y)) < 0.2
    return (y + 2.0 * rng.standard_normal((n, d)) * squashed).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in ACTIVATIONS if k not in ("none", "relu")])
def test_nonlinear_beats_linear_for_other_activations(kind: str) -> None:
    params = PARAMS.get(kind, {})
    y = planted_layer(kind)
    target = apply_activation(kind, params, y)
    linear = fit_nonlinear(y, y, 5, schedule=()).factors
    nonlinear = fit_nonlinear(y, y, 5, kind, params).factors
    error_linear = np.linalg.norm(target - apply_activation(kind, params, linear.apply(y)))
    error_nonlinear = np.linalg.norm(target - apply_activation(kind, params, nonlinear.apply(y)))
    assert error_nonlinear < 0.95 * error_linear


@pytest.mark.parametrize("kind", ["silu", "clip"])
def test_objective_is_monotone_for_other_activations(kind: str) -> None:
    y = planted_layer(kind)
    fit = fit_nonlinear(y, y, 5, kind, PARAMS.get(kind, {}), schedule=((0.05, 10), (1.0, 10)), tol=0.0)
    for stage in (fit.objective[:10], fit.objective[10:]):
        assert all(b <= a * (1 + 1e-5) for a, b in zip(stage, stage[1:]))


def test_no_activation_is_the_closed_form_least_squares() -> None:
    rng = np.random.default_rng(4)
    y = rng.standard_normal((800, 10)).astype(np.float32) @ rng.standard_normal((10, 10)).astype(np.float32)
    fit = fit_nonlinear(y, y, 4, "none")
    centred = (y - y.mean(axis=0)).astype(np.float64)
    top = np.linalg.svd(centred, full_matrices=False)[2][:4].T  # PCA, independently: the top principal directions
    P = fit.factors.P
    assert fit.objective == [] and np.allclose(P @ P.T, top @ top.T, atol=1e-4)


def test_unknown_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        z_update("swish2", {}, np.zeros(3), np.zeros(3), 1.0)
