"""PCA solver (paper Eq. 4) against planted solutions and an independent SVD reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.solvers import ResponseStats, fit_pca
from onnx_lowrank.solvers.activations import apply_activation
from onnx_lowrank.solvers.factors import spectrum_energy


def planted_responses(n: int, d: int, rank: int, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    scales = np.linspace(3.0, 1.0, rank)
    y = (rng.standard_normal((n, rank)) * scales) @ basis.T + rng.standard_normal(d) * 5
    return y + noise * rng.standard_normal((n, d)), basis


def test_pca_recovers_a_planted_subspace_exactly() -> None:
    y, basis = planted_responses(2000, 24, 5)
    factors = fit_pca(ResponseStats.from_responses(y), 5)
    projector = factors.P @ factors.Q.T
    np.testing.assert_allclose(projector, basis @ basis.T, atol=1e-8)
    np.testing.assert_allclose(factors.apply(y), y, atol=1e-8 * np.abs(y).max())


def test_pca_matches_an_svd_reference_on_noisy_data() -> None:
    y, _ = planted_responses(3000, 32, 6, noise=0.3, seed=1)
    rank = 6
    centred = y - y.mean(axis=0)
    reference_basis = np.linalg.svd(centred, full_matrices=False)[2][:rank].T
    reference = centred @ reference_basis @ reference_basis.T + y.mean(axis=0)
    factors = fit_pca(ResponseStats.from_responses(y), rank)
    np.testing.assert_allclose(factors.apply(y), reference, atol=1e-8)


def test_fewer_samples_than_channels_give_the_spectrum_and_pca_of_the_scatter() -> None:
    """A wide dense layer's statistics come from the samples' SVD: against NumPy's eigh of the
    scatter, the same spectrum, the same PCA at every rank the samples span, an orthonormal basis."""
    rng = np.random.default_rng(5)
    samples = rng.standard_normal((30, 200)) * np.linspace(3, 0.1, 200)
    stats = ResponseStats.from_responses(samples)
    centred = samples - samples.mean(axis=0)
    reference = np.sort(np.clip(np.linalg.eigvalsh(centred.T @ centred), 0, None))[::-1]
    np.testing.assert_allclose(stats.eigenvalues, reference, atol=1e-8 * reference[0])
    np.testing.assert_allclose(stats.eigenvectors.T @ stats.eigenvectors, np.eye(200), atol=1e-10)
    for rank in (1, 10, 29):
        fit = fit_pca(stats, rank)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projector = vt[:rank].T @ vt[:rank]
        np.testing.assert_allclose(fit.P @ fit.Q.T, projector, atol=1e-8)


def test_error_decreases_with_rank_and_full_rank_is_exact() -> None:
    y, _ = planted_responses(1500, 20, 20, noise=0.1, seed=2)
    stats = ResponseStats.from_responses(y)
    errors = [np.linalg.norm(y - fit_pca(stats, r).apply(y)) for r in range(1, 21)]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-9 * errors[0] and errors[-2] < errors[0]
    y32 = y.astype(np.float32)
    full = fit_pca(ResponseStats.from_responses(y32), 20).apply(y32)
    assert np.linalg.norm(full - y32) / np.linalg.norm(y32) < 1e-6


def test_energy_is_the_fraction_of_variance_kept() -> None:
    y, _ = planted_responses(1000, 10, 3, seed=3)
    stats = ResponseStats.from_responses(y)
    assert spectrum_energy(stats.eigenvalues, 3) == pytest.approx(1.0)
    centred = y - y.mean(axis=0)
    kept = np.linalg.norm(fit_pca(stats, 1).apply(y) - y.mean(axis=0)) ** 2
    assert spectrum_energy(stats.eigenvalues, 1) == pytest.approx(kept / np.linalg.norm(centred) ** 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_signs_are_deterministic_and_basis_is_orthonormal(d: int, seed: int) -> None:
    y = np.random.default_rng(seed).standard_normal((50, d))
    first = fit_pca(ResponseStats.from_responses(y), max(1, d // 2))
    again = fit_pca(ResponseStats.from_responses(y.copy()), max(1, d // 2))
    np.testing.assert_array_equal(first.P, again.P)
    np.testing.assert_allclose(first.Q.T @ first.Q, np.eye(first.rank), atol=1e-10)
    pivots = np.abs(first.P).argmax(axis=0)
    assert np.all(first.P[pivots, np.arange(first.rank)] > 0)


@pytest.mark.parametrize("rank", [0, 11, 2.5])
def test_invalid_rank_is_rejected(rank) -> None:
    stats = ResponseStats.from_responses(np.random.default_rng(0).standard_normal((30, 10)))
    with pytest.raises(ValueError, match="rank must be"):
        fit_pca(stats, rank)


@pytest.mark.parametrize("bad, error", [(np.zeros(5), ValueError), (np.zeros((1, 4)), ValueError),
                                        (np.array([[1.0, np.nan], [0.0, 1.0]]), InvalidOptionError)])
def test_invalid_responses_are_rejected(bad, error) -> None:
    """A wrong shape is our bug; NaN responses come from the user's model on the user's data."""
    with pytest.raises(error):
        ResponseStats.from_responses(bad)


def test_activations() -> None:
    v = np.array([-2.0, -0.5, 0.0, 3.0, 8.0])
    np.testing.assert_array_equal(apply_activation("relu", {}, v), [0, 0, 0, 3, 8])
    np.testing.assert_array_equal(apply_activation("clip", {"min": 0.0, "max": 6.0}, v), [0, 0, 0, 3, 6])
    np.testing.assert_allclose(apply_activation("leaky_relu", {"alpha": 0.1}, v), [-0.2, -0.05, 0, 3, 8])
    np.testing.assert_array_equal(apply_activation("none", {}, v), v)


def test_math_modules_do_not_import_onnx() -> None:
    code = ("import sys, onnx_lowrank.solvers, onnx_lowrank.solvers.activations, onnx_lowrank.solvers.zstep, "
            "onnx_lowrank.solvers.rrr, onnx_lowrank.solvers.nonlinear, onnx_lowrank.solvers.weights, onnx_lowrank.planning.ranks, "
            "onnx_lowrank.planning.costs, onnx_lowrank.planning.plans; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnx_graphsurgeon')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("shape, rank", [((50, 5), 8), ((50, 5), 3), ((6, 40), 4), ((40, 12), 12)])
def test_top_left_singular_vectors_span_the_svds_and_complete_it_orthonormally(shape, rank) -> None:
    from onnx_lowrank.solvers.factors import top_left_singular_vectors

    matrix = np.random.default_rng(11).standard_normal(shape)
    basis = top_left_singular_vectors(matrix, rank)
    reference = np.linalg.svd(matrix, full_matrices=False)[0][:, :min(rank, min(shape))]
    kept = reference.shape[1]
    assert basis.shape == (shape[0], rank)
    np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(basis[:, :kept] @ basis[:, :kept].T, reference @ reference.T, atol=1e-8)
