"""Nonlinear response reconstruction (paper Eq. 5-6, 9-11), symmetric or asymmetric (Eq. 12).

Minimises ``sum_i ||r(y_i) - r(M yhat_i + b)||^2`` over rank-``r`` ``M`` and ``b`` through the
relaxation of Eq. 6, alternating the reduced-rank regression step for ``(M, b)`` with the
per-element update of the auxiliary ``z`` (:mod:`onnx_lowrank.solvers.zstep`). ``y`` are the
original network's pre-activation responses, ``yhat`` the responses to the approximated input
(``yhat = y`` in the symmetric case). With no activation the problem is linear and is solved in
closed form by :func:`linear_fit`.

Speed: ``yhat`` is centred and whitened once per layer, keeping only its ``m`` non-negligible
directions (see :mod:`onnx_lowrank.solvers.rrr`). Each iteration is then two float32 GEMMs, the
prediction ``W Q P^T`` (``M`` kept factored) and the cross product ``Z^T W`` (n x d x m), and
the elementwise z-step and objective on cache-sized blocks in a thread pool.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from onnx_lowrank.solvers.activations import SMOOTH, apply_activation, validate_activation
from onnx_lowrank.solvers.factors import LowRankFactors, validate_rank, validate_responses
from onnx_lowrank.solvers.rrr import ReducedRankRegression
from onnx_lowrank.solvers.zstep import z_update

# The paper's schedule: warm up with a weak penalty, then tighten it.
PAPER_SCHEDULE = ((0.01, 25), (1.0, 25))
BLOCK_ROWS = 1024


@dataclass
class NonlinearFit:
    factors: LowRankFactors
    objective: list[float] = field(default_factory=list)  # Eq. 6 after each z-step
    iterations: list[int] = field(default_factory=list)  # per stage of the schedule


class _CentredInput:
    """``yhat`` centred and whitened (n x m, float32), its mean and the regression: once per layer."""

    def __init__(self, y_hat: np.ndarray) -> None:
        self.mean = y_hat.mean(axis=0, dtype=np.float64)
        centred = np.asarray(y_hat, dtype=np.float32) - self.mean.astype(np.float32)
        wide = centred.astype(np.float64)  # float64 keeps Y Y^T positive semi-definite
        self.regression = ReducedRankRegression.of_samples(wide)
        del wide
        self.values = centred @ self.regression.transform.astype(np.float32)

    @classmethod
    def of_moments(cls, mean: np.ndarray, scatter: np.ndarray) -> "_CentredInput":
        """From the input's mean and scatter alone: the regression, without ``values``."""
        inputs = cls.__new__(cls)
        inputs.mean, inputs.regression, inputs.values = mean, ReducedRankRegression(scatter), None
        return inputs

    def regress(self, target_mean: np.ndarray, cross: np.ndarray, rank: int) -> "_CentredFit":
        """Rank-``rank`` fit of a target with column means ``target_mean`` and ``cross = Z^T W``
        (``W`` has zero column sums, so centring ``Z`` would not change it)."""
        P, whitened_q = self.regression.solve_whitened(cross, rank)
        return _CentredFit(P, whitened_q, target_mean)

    def factors(self, fit: "_CentredFit") -> LowRankFactors:
        Q = self.regression.transform @ fit.Q
        return LowRankFactors(fit.P, Q, fit.offset - fit.P @ (Q.T @ self.mean))


@dataclass
class _CentredFit:
    """``prediction = W Q P^T + offset``, on the whitened centred input ``W``."""

    P: np.ndarray
    Q: np.ndarray
    offset: np.ndarray


def closed_form_from_moments(input_mean: np.ndarray, input_scatter: np.ndarray, target_mean: np.ndarray,
                             cross: np.ndarray, rank: int) -> LowRankFactors:
    """:func:`fit_nonlinear`'s closed-form start (the reduced-rank regression of Eq. 12, no
    iterations) from moments instead of samples: the input's mean and scatter ``Yc-hat^T Yc-hat``
    and the cross-moment ``Y^T Yc-hat`` (d x d-hat). Where the input is linear in something
    smaller (a split layer's output in its basis), these cost far less than the samples' products."""
    rank = validate_rank(rank, len(target_mean))
    inputs = _CentredInput.of_moments(np.asarray(input_mean, dtype=np.float64),
                                      np.asarray(input_scatter, dtype=np.float64))
    whitened_cross = np.asarray(cross, dtype=np.float64) @ inputs.regression.transform  # Y^T W, as _gram gives it
    return inputs.factors(inputs.regress(np.asarray(target_mean, dtype=np.float64), whitened_cross, rank))


def linear_fit(y_hat: np.ndarray, y: np.ndarray, rank: int) -> LowRankFactors:
    """Asymmetric linear solution ``min ||(y - ybar) - M (yhat - yhatbar)||`` (PCA when ``yhat = y``)."""
    y_hat, y = _validated_pair(y_hat, y)
    rank = validate_rank(rank, y.shape[1])
    inputs = _CentredInput(y_hat)
    return inputs.factors(inputs.regress(y.mean(axis=0, dtype=np.float64), _gram(y, inputs.values), rank))


def fit_nonlinear(y_hat: np.ndarray, y: np.ndarray, rank: int, activation: str = "relu",
                  params: dict[str, float] | None = None,
                  schedule: tuple[tuple[float, int], ...] = PAPER_SCHEDULE, tol: float = 1e-4) -> NonlinearFit:
    """Alternating solver of Eq. 6 for ``r = activation``, initialised from :func:`linear_fit`.

    ``schedule`` lists ``(lambda, max_iterations)`` stages. A stage ends early once an iteration
    lowers Eq. 6 by no more than ``tol`` (relative); with ``tol=0`` it ends only when Eq. 6 stops
    decreasing, so the paper's schedule runs in full unless the solver has converged.
    """
    y_hat, y = _validated_pair(y_hat, y)
    rank = validate_rank(rank, y.shape[1])
    validate_activation(activation)
    params = params or {}
    for lam, iterations in schedule:
        if not lam > 0 or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"schedule entries must be (lambda > 0, iterations >= 0), got {(lam, iterations)}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    inputs = _CentredInput(y_hat)
    # Directions beyond the input's own m have zero factors whatever they are (a wide dense layer
    # fitted on fewer samples than channels): the iterations leave them out, the end completes them.
    working = min(rank, max(inputs.values.shape[1], 1))  # an input without variance still gets a rank-1 fit
    regression = (y.mean(axis=0, dtype=np.float64), _gram(y, inputs.values))
    fit = inputs.regress(*regression, rank)
    result = NonlinearFit(inputs.factors(fit))
    if activation == "none":
        return result
    target = apply_activation(activation, params, y.astype(np.float32))
    z = None  # the smooth z-step keeps the previous z as a candidate (see zstep)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for lam, iterations in schedule:
            stage: list[float] = []
            for _ in range(iterations):
                previous = z if activation in SMOOTH else None
                z, objective = _z_pass(inputs.values, target, fit, activation, params, lam, previous, pool)
                regression = (z.mean(axis=0, dtype=np.float64), _gram(z, inputs.values))
                fit = inputs.regress(*regression, working)
                stage.append(objective)
                if len(stage) > 1 and stage[-2] - objective <= tol * abs(objective):
                    break
            result.objective.extend(stage)
            result.iterations.append(len(stage))
    result.factors = inputs.factors(inputs.regress(*regression, rank) if working < rank else fit)
    return result


def _z_pass(centred, target, fit: _CentredFit, activation, params, lam, previous, pool) -> tuple[np.ndarray, float]:
    """One iteration's z-step over the whitened samples: the new z and Eq. 6 at it.

    The prediction is a whole-array GEMM (BLAS threads); the elementwise z-step runs on
    cache-sized row blocks in ``pool`` (NumPy releases the GIL), writing z over the prediction.
    """
    m, rank = fit.Q.shape
    d = fit.P.shape[0]
    if rank * (m + d) >= m * d:  # high rank: one square GEMM with M beats two skinny ones
        z = centred @ (fit.Q @ fit.P.T).astype(np.float32)
    else:
        z = (centred @ fit.Q.astype(np.float32)) @ fit.P.T.astype(np.float32)
    z += fit.offset.astype(np.float32)

    def z_step_block(start: int) -> float:
        rows = slice(start, start + BLOCK_ROWS)
        prediction, t = z[rows], target[rows]
        block = z_update(activation, params, t, prediction, lam, None if previous is None else previous[rows])
        objective = _relaxed_objective(activation, params, t, block, prediction, lam)
        z[rows] = block
        return objective

    return z, sum(pool.map(z_step_block, range(0, len(target), BLOCK_ROWS)))


def _relaxed_objective(activation, params, target, z, prediction, lam) -> float:
    """Eq. 6: ``sum ||r(y) - r(z)||^2 + lambda ||z - (M yhat + b)||^2``."""
    fit_error = target - apply_activation(activation, params, z)
    penalty = z - prediction
    return float(np.vdot(fit_error, fit_error) + lam * np.vdot(penalty, penalty))


def _validated_pair(y_hat: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_hat, y = validate_responses(y_hat), validate_responses(y)
    if y_hat.shape != y.shape:
        raise ValueError(f"yhat and y must have the same shape, got {y_hat.shape} and {y.shape}")
    return y_hat, y


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^T b`` in float32 arithmetic (fast BLAS) accumulated into a float64 result."""
    return (a.astype(np.float32, copy=False).T @ b.astype(np.float32, copy=False)).astype(np.float64)
