"""Data-free baselines (groundwork for the baselines issue) against planted and reference solutions."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.solvers.weights import spatial_filter_reconstruction, tucker2, weight_spectrum, weight_svd


def test_weight_svd_is_the_eckart_young_optimum_and_keeps_the_bias() -> None:
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((24, 8, 3, 3)), rng.standard_normal(24)
    factors = weight_svd(weight, bias, 6)
    matrix = weight.reshape(24, -1)
    approx = factors.P @ (factors.Q.T @ matrix)
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert np.linalg.norm(matrix - approx) == pytest.approx(np.sqrt(np.sum(singular[6:] ** 2)))
    inputs = rng.standard_normal((50, 72))
    # The chain computes M (W x + b) + b_new; it must equal the truncated weights' response plus b.
    np.testing.assert_allclose(factors.apply(inputs @ matrix.T + bias), inputs @ approx.T + bias, atol=1e-10)


def test_weight_svd_reproduces_a_planted_low_rank_weight() -> None:
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((16, 4)) @ rng.standard_normal((4, 5 * 3 * 3))).reshape(16, 5, 3, 3)
    factors = weight_svd(weight, np.zeros(16), 4)
    np.testing.assert_allclose(factors.P @ factors.Q.T @ weight.reshape(16, -1), weight.reshape(16, -1), atol=1e-10)


def reconstruct(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    return np.einsum("ojx,jiy->oiyx", horizontal[:, :, 0, :], vertical[:, :, :, 0])


def test_spatial_scheme2_reproduces_planted_separable_filters() -> None:
    rng = np.random.default_rng(2)
    v, h = rng.standard_normal((3, 6, 5, 1)), rng.standard_normal((10, 3, 1, 5))
    planted = reconstruct(v, h)
    vertical, horizontal = spatial_filter_reconstruction(planted, 3)
    assert vertical.shape == (3, 6, 5, 1) and horizontal.shape == (10, 3, 1, 5)
    np.testing.assert_allclose(reconstruct(vertical, horizontal), planted, atol=1e-9)


@pytest.mark.parametrize("shape", [(12, 7, 3, 3), (5, 16, 3, 3)])  # a wide and a tall filter matrix
def test_spatial_scheme2_error_is_the_truncated_svd_optimum(shape) -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal(shape)
    d, c, kh, kw = shape
    vertical, horizontal = spatial_filter_reconstruction(weight, 4)
    error = np.linalg.norm(weight - reconstruct(vertical, horizontal))
    singular = np.linalg.svd(weight.transpose(1, 2, 0, 3).reshape(c * kh, d * kw), compute_uv=False)
    assert error == pytest.approx(np.sqrt(np.sum(singular[4:] ** 2)))
    for _ in range(20):  # no nearby pair of filter banks does better
        worse = reconstruct(vertical + 0.01 * rng.standard_normal(vertical.shape),
                            horizontal + 0.01 * rng.standard_normal(horizontal.shape))
        assert np.linalg.norm(weight - worse) >= error - 1e-12


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        weight_svd(np.zeros(4), np.zeros(4), 2)
    with pytest.raises(ValueError, match="weight"):
        weight_svd(np.full((4, 4), np.nan), np.zeros(4), 2)
    with pytest.raises(ValueError, match="conv weight"):
        spatial_filter_reconstruction(np.zeros((4, 4)), 2)


def test_weight_svd_of_a_dense_layer_is_its_truncated_svd() -> None:
    rng = np.random.default_rng(4)
    weight, bias = rng.standard_normal((9, 6)), rng.standard_normal(9)
    factors = weight_svd(weight, bias, 3)
    left = np.linalg.svd(weight)[0][:, :3]
    np.testing.assert_allclose(factors.P @ factors.Q.T, left @ left.T, atol=1e-10)


def test_tucker2_reproduces_a_planted_tucker_weight() -> None:
    rng = np.random.default_rng(4)
    core = rng.standard_normal((5, 3, 3, 3))
    out_basis, in_basis = rng.standard_normal((12, 5)), rng.standard_normal((9, 3))
    planted = np.einsum("rsyx,or,is->oiyx", core, out_basis, in_basis)
    first, middle, last = tucker2(planted, 3, 5)
    assert first.shape == (3, 9, 1, 1) and middle.shape == (5, 3, 3, 3) and last.shape == (12, 5, 1, 1)
    rebuilt = np.einsum("rsyx,or,si->oiyx", middle, last[:, :, 0, 0], first[:, :, 0, 0])
    np.testing.assert_allclose(rebuilt, planted, atol=1e-9)


def test_tucker2_bases_are_the_top_singular_vectors_of_each_unfolding() -> None:
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((10, 8, 3, 3))
    first, _, last = tucker2(weight, 4, 6)
    for basis, unfolding in ((last[:, :, 0, 0], weight.reshape(10, -1)),
                             (first[:, :, 0, 0].T, weight.transpose(1, 0, 2, 3).reshape(8, -1))):
        left = np.linalg.svd(unfolding, full_matrices=False)[0][:, :basis.shape[1]]
        np.testing.assert_allclose(np.abs(basis.T @ left), np.eye(basis.shape[1]), atol=1e-8)


@pytest.mark.parametrize("shape", [(7, 6, 3, 4), (2, 9, 3, 1)])  # wide and tall matrices, both schemes
@pytest.mark.parametrize("scheme, rows", [("channel", lambda w: w.reshape(w.shape[0], -1)),
                                          ("spatial", lambda w: w.transpose(1, 2, 0, 3).reshape(
                                              w.shape[1] * w.shape[2], -1))])
def test_weight_spectrum_is_the_squared_singular_values_of_what_the_scheme_truncates(scheme, rows, shape) -> None:
    weight = np.random.default_rng(6).standard_normal(shape)
    expected = np.linalg.svd(rows(weight), compute_uv=False) ** 2
    spectrum = weight_spectrum(weight, scheme)
    assert spectrum.shape == expected.shape
    np.testing.assert_allclose(spectrum, expected, rtol=1e-9, atol=1e-12 * expected[0])


@pytest.mark.parametrize("shape", [(12, 8, 3, 3), (6, 4, 3, 3, 3)])
def test_a_kept_svd_gives_the_same_filter_reconstruction_at_every_rank(shape) -> None:
    from onnx_lowrank.solvers.weights import filter_reconstruction_svd

    weight = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    svd = filter_reconstruction_svd(weight)
    for rank in (1, 3, 6):
        for kept, fresh in zip(spatial_filter_reconstruction(weight, rank, svd), spatial_filter_reconstruction(weight, rank)):
            np.testing.assert_array_equal(kept, fresh)
