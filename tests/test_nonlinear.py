"""Reduced-rank regression and the nonlinear alternating solver (paper Eq. 6-11) on planted data."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.solvers import ResponseStats, fit_pca
from onnx_lowrank.solvers.nonlinear import fit_nonlinear
from onnx_lowrank.solvers.rrr import ReducedRankRegression
from onnx_lowrank.solvers.zstep import relu_z_update


def reduced_rank_regression(scatter, cross, rank):
    """(P, Q) with M = P Q^T, from the whitened solve."""
    solver = ReducedRankRegression(scatter)
    P, whitened_q = solver.solve_whitened(cross @ solver.transform, rank)
    return P, solver.transform @ whitened_q


def brute_force_rrr(z: np.ndarray, y: np.ndarray, rank: int) -> np.ndarray:
    """Reference: whiten Y, take the rank-r SVD truncation of the whitened least-squares fit."""
    m_hat = np.linalg.lstsq(y.T, z.T, rcond=None)[0].T
    values, vectors = np.linalg.eigh(y @ y.T)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    u, s, vt = np.linalg.svd(m_hat @ root)
    truncated = u[:, :rank] @ np.diag(s[:rank]) @ vt[:rank]
    return truncated @ np.linalg.inv(root)


def test_rrr_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((12, 800)) * np.linspace(3, 0.5, 12)[:, None]
    z = rng.standard_normal((12, 12)) @ y + 0.3 * rng.standard_normal((12, 800))
    P, Q = reduced_rank_regression(y @ y.T, z @ y.T, 4)
    np.testing.assert_allclose(P @ Q.T, brute_force_rrr(z, y, 4), atol=1e-8)


def test_fewer_samples_than_channels_solve_from_the_samples_as_from_their_scatter() -> None:
    """A wide dense layer (one sample per image): the thin SVD of the samples replaces the d x d
    eigendecomposition and must give the fit the scatter gives, here a minimum-norm fit to the
    brute-force reference on the samples' span."""
    rng = np.random.default_rng(4)
    y = rng.standard_normal((300, 40)) * np.linspace(3, 0.5, 40)  # 40 samples of 300 channels
    z = rng.standard_normal((300, 300)) @ y / 10 + 0.1 * rng.standard_normal((300, 40))
    from_samples = ReducedRankRegression.of_samples(y.T)
    from_scatter = ReducedRankRegression(y @ y.T)
    assert from_samples.transform.shape == from_scatter.transform.shape == (300, 40)
    fits = []
    for solver in (from_samples, from_scatter):
        P, whitened_q = solver.solve_whitened(z @ y.T @ solver.transform, 5)
        fits.append(P @ (solver.transform @ whitened_q).T @ y)
    np.testing.assert_allclose(fits[0], fits[1], atol=1e-8 * np.abs(fits[1]).max())
    whitened = y.T @ from_samples.transform
    np.testing.assert_allclose(whitened.T @ whitened, np.eye(40), atol=1e-8)


def test_rrr_is_optimal_among_random_rank_r_matrices() -> None:
    rng = np.random.default_rng(1)
    y = rng.standard_normal((8, 500))
    z = rng.standard_normal((8, 8)) @ y + rng.standard_normal((8, 500))
    P, Q = reduced_rank_regression(y @ y.T, z @ y.T, 3)
    best = np.linalg.norm(z - P @ Q.T @ y)
    for _ in range(200):
        candidate = (P + 0.05 * rng.standard_normal(P.shape)) @ (Q + 0.05 * rng.standard_normal(Q.shape)).T
        assert np.linalg.norm(z - candidate @ y) >= best - 1e-9


def test_rrr_with_z_equal_y_is_pca() -> None:
    rng = np.random.default_rng(2)
    samples = rng.standard_normal((2000, 10)) * np.linspace(4, 0.2, 10)
    samples = samples @ np.linalg.qr(rng.standard_normal((10, 10)))[0]
    stats = ResponseStats.from_responses(samples)
    P, Q = reduced_rank_regression(stats.scatter, stats.scatter, 4)
    pca = fit_pca(stats, 4)
    np.testing.assert_allclose(P @ Q.T, pca.P @ pca.Q.T, atol=1e-8)


def test_rrr_survives_rank_deficient_responses() -> None:
    rng = np.random.default_rng(3)
    y = rng.standard_normal((3, 400))
    y = np.vstack([y, y[:2] + y[1:]])  # 5 channels, rank 3
    P, Q = reduced_rank_regression(y @ y.T, y @ y.T, 3)
    assert np.all(np.isfinite(P)) and np.linalg.norm(y - P @ Q.T @ y) < 1e-3 * np.linalg.norm(y)


@pytest.mark.parametrize("lam", [0.01, 1.0, 10.0])
def test_relu_z_update_is_the_exact_1d_minimiser(lam: float) -> None:
    rng = np.random.default_rng(4)
    target = np.maximum(rng.standard_normal(300), 0)
    prediction = 2 * rng.standard_normal(300)
    z = relu_z_update(target, prediction, lam)
    grid = np.linspace(-8, 8, 32001)
    for t, p, best in zip(target, prediction, z):
        costs = (t - np.maximum(grid, 0)) ** 2 + lam * (grid - p) ** 2
        assert (t - max(best, 0)) ** 2 + lam * (best - p) ** 2 <= costs.min() + 1e-6


def planted_relu_layer(n: int = 6000, d: int = 32, rank: int = 6, seed: int = 5):
    """Responses whose pre-activation is low rank plus noise that matters only below zero."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    y = (rng.standard_normal((n, rank)) * 2) @ basis.T + rng.standard_normal(d) * 0.5
    y = y + 0.6 * rng.standard_normal((n, d)) * (y < 0)
    return y.astype(np.float32)


def test_objective_never_increases_within_a_penalty_stage() -> None:
    y = planted_relu_layer()
    fit = fit_nonlinear(y, y, 6, schedule=((0.01, 15), (1.0, 15)), tol=0.0)
    for stage in (fit.objective[:15], fit.objective[15:]):
        assert all(b <= a * (1 + 1e-5) for a, b in zip(stage, stage[1:]))


def test_nonlinear_beats_linear_on_rectified_responses() -> None:
    y = planted_relu_layer()
    relu = np.maximum(y, 0)
    linear = fit_nonlinear(y, y, 6, schedule=()).factors  # its linear start
    nonlinear = fit_nonlinear(y, y, 6).factors
    error_linear = np.linalg.norm(relu - np.maximum(linear.apply(y), 0))
    error_nonlinear = np.linalg.norm(relu - np.maximum(nonlinear.apply(y), 0))
    assert error_nonlinear < 0.95 * error_linear


def test_asymmetric_fit_corrects_a_distorted_input() -> None:
    rng = np.random.default_rng(6)
    y = planted_relu_layer(seed=7)
    mixing = np.eye(32) + 0.2 * rng.standard_normal((32, 32))
    y_hat = (y @ mixing.T + 0.3).astype(np.float32)  # what an approximated earlier layer would give
    relu = np.maximum(y, 0)
    symmetric = fit_nonlinear(y_hat, y_hat, 6).factors
    asymmetric = fit_nonlinear(y_hat, y, 6).factors
    error_sym = np.linalg.norm(relu - np.maximum(symmetric.apply(y_hat), 0))
    error_asym = np.linalg.norm(relu - np.maximum(asymmetric.apply(y_hat), 0))
    assert error_asym < 0.5 * error_sym


def test_expanding_layer_with_rank_deficient_input_is_solved_exactly() -> None:
    """A 1x1 conv expanding 12 -> 40 channels: its responses span 12 dimensions. The rank-12 fit is
    exact (no ridge bias), and a rank above 12 still returns well-formed factors."""
    rng = np.random.default_rng(8)
    y = (rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 40)) + 1.0).astype(np.float32)
    for rank in (12, 16):
        fit = fit_nonlinear(y, y, rank)
        assert fit.factors.P.shape == (40, rank) and np.all(np.isfinite(fit.factors.Q))
        relu = np.maximum(y, 0)
        assert np.linalg.norm(relu - np.maximum(fit.factors.apply(y), 0)) < 1e-4 * np.linalg.norm(relu)


def test_a_rank_above_the_inputs_span_fits_as_the_span_does_with_an_orthonormal_completion() -> None:
    """A wide dense layer fitted on fewer samples than channels (one per image): directions beyond
    the input's span have zero factors, so a rank above it predicts exactly what the span's rank
    does, with orthonormal, finite factors of the rank asked for."""
    rng = np.random.default_rng(9)
    y = (rng.standard_normal((40, 300)) * np.linspace(3, 0.1, 300)).astype(np.float32)  # 40 samples, 300 wide
    y_hat = y + 0.1 * rng.standard_normal(y.shape).astype(np.float32)
    within = fit_nonlinear(y_hat, y, 39).factors  # 40 centred samples span 39 directions
    above = fit_nonlinear(y_hat, y, 120).factors
    assert above.P.shape == (300, 120) and above.Q.shape == (300, 120) and np.all(np.isfinite(above.Q))
    np.testing.assert_allclose(above.P.T @ above.P, np.eye(120), atol=1e-6)
    np.testing.assert_allclose(above.apply(y_hat), within.apply(y_hat), atol=1e-4 * np.abs(y).max())


def test_an_input_without_variance_still_gets_factors_of_the_rank_asked() -> None:
    """A constant input (a layer fed a constant, as generated graphs may be): no direction to
    regress on, so the fit is the target's mean, with finite factors of the rank asked."""
    rng = np.random.default_rng(10)
    y = rng.standard_normal((50, 6)).astype(np.float32)
    y_hat = np.ones((50, 6), dtype=np.float32)
    fit = fit_nonlinear(y_hat, y, 2).factors
    assert fit.P.shape == (6, 2) and np.all(np.isfinite(fit.Q)) and np.all(np.isfinite(fit.bias))
    np.testing.assert_allclose(fit.apply(y_hat), np.broadcast_to(fit.apply(y_hat)[0], (50, 6)), atol=1e-6)


def test_the_closed_form_from_moments_is_the_one_from_samples_and_the_least_squares_optimum() -> None:
    """Planted: y = relu(M x + b) with M of rank 4; the input x-hat a distorted x. The closed form
    from the input's mean, scatter and cross-moment is fit_nonlinear's closed form from the
    samples, and (independently) the rank-4 least-squares fit of y on x-hat, which the
    reduced-rank regression is: no rank-4 map does better."""
    from onnx_lowrank.solvers.nonlinear import closed_form_from_moments

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 12))
    y_hat = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    y = np.maximum(x @ (rng.standard_normal((12, 4)) @ rng.standard_normal((4, 12))) + 0.3, 0).astype(np.float32)
    centred = y_hat.astype(np.float64) - y_hat.mean(axis=0)
    moments = (y_hat.mean(axis=0, dtype=np.float64), centred.T @ centred, y.mean(axis=0, dtype=np.float64),
               y.astype(np.float64).T @ centred)
    fit = closed_form_from_moments(*moments, 4)
    samples = fit_nonlinear(y_hat, y, 4, schedule=()).factors
    np.testing.assert_allclose(fit.apply(y_hat), samples.apply(y_hat), rtol=1e-4, atol=1e-4)
    error = np.linalg.norm(fit.apply(y_hat) - y)
    for _ in range(20):  # random rank-4 maps with least-squares offsets do no better
        M = rng.standard_normal((12, 4)) @ rng.standard_normal((4, 12))
        prediction = y_hat @ M.T
        prediction += (y - prediction).mean(axis=0)
        assert error <= np.linalg.norm(prediction - y) + 1e-6
