"""Data-free decompositions of a conv's weights, the baselines of the paper's comparisons (§4).

Pure NumPy. ``weight`` is an ONNX Conv weight ``(d, c, kh, kw)``.

* :func:`weight_svd`: truncated SVD of the ``d x (c kh kw)`` matrix (Denton et al. 2014 style),
  the best rank-``r`` approximation of the weights (Eckart-Young), in the channel
  decomposition's ``(P, Q, b)`` form.
* :func:`spatial_filter_reconstruction`: Jaderberg et al. 2014 "scheme 2", ``d''`` vertical
  ``kh x 1`` filters then ``d`` horizontal ``1 x kw`` filters, minimising the filter
  reconstruction error ``||W - sum_j H_j * V_j||``. That problem is a rank-``d''`` approximation
  of ``W`` rearranged as a ``(c kh) x (d kw)`` matrix, so its optimum is the truncated SVD of that
  matrix (closed form, as Zhang et al. note in §3.5); Jaderberg et al.'s alternating solver
  converges to the same minimiser, more slowly.
* :func:`tucker2`: Tucker-2 by HOSVD (Kim et al. 2016 style): the top ``r1`` input-channel and
  ``r2`` output-channel singular vectors of the weight's two channel unfoldings and the core they
  leave, ``(1 x 1, c -> r1) -> (kh x kw, r1 -> r2) -> (1 x 1, r2 -> d)``.
* :func:`weight_spectrum`: the squared singular values each scheme truncates, for energy-based
  rank selection of these data-free baselines.
"""

from __future__ import annotations

import numpy as np

from onnx_lowrank.solvers.factors import LowRankFactors, deterministic_signs, top_left_singular_vectors, validate_rank


def weight_svd(weight: np.ndarray, bias: np.ndarray, rank: int) -> LowRankFactors:
    """``P = Q = U_r`` (top left singular vectors of the weights): the chain computes
    ``U_r U_r^T W x + b``, so the new bias is ``b - U_r U_r^T b``."""
    matrix = _finite(weight).reshape(np.shape(weight)[0], -1).astype(np.float64)
    basis = _top_left_basis(matrix, validate_rank(rank, min(matrix.shape)))
    bias = np.asarray(bias, np.float64)
    return LowRankFactors(basis, basis.copy(), bias - basis @ (basis.T @ bias))


def filter_reconstruction_svd(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The left singular vectors and values the filter reconstruction truncates: one SVD gives
    every rank (a budget search builds a layer's split at many)."""
    return _left_singular_pairs(_filter_matrix(_planar(weight)))


def spatial_filter_reconstruction(weight: np.ndarray, rank: int,
                                  svd: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(vertical (d'', c, kh, 1), horizontal (d, d'', 1, kw))`` with
    ``W[o, i, y, x] ~ sum_j horizontal[o, j, 0, x] * vertical[j, i, y, 0]``; ``svd`` is
    :func:`filter_reconstruction_svd` of ``weight``, where it was computed before.

    A 3-D weight ``(d, c, kt, kh, kw)`` is split the same way into a spatial ``(d'', c, 1, kh,
    kw)`` and a temporal ``(d, d'', kt, 1, 1)`` part (the (2+1)-D factorisation of video
    networks): the same problem with the ``kh kw`` taps as the rows and ``kt`` as the columns."""
    if np.ndim(weight) == 5:
        d, c, kt, kh, kw = np.shape(weight)
        spatial, temporal = spatial_filter_reconstruction(_planar(weight), rank, svd)
        rank = spatial.shape[0]
        return spatial.reshape(rank, c, 1, kh, kw), temporal.reshape(d, rank, kt, 1, 1)
    w = _validated(weight).astype(np.float64)
    d, c, kh, kw = w.shape
    rank = validate_rank(rank, min(c * kh, d * kw))
    matrix = _filter_matrix(w)
    left, values = svd or _left_singular_pairs(matrix)
    left = deterministic_signs(left[:, :rank])
    right_t = left.T @ matrix  # diag(s_r) V_r^T, with the signs chosen for left
    # A direction with no energy (rank above the weights' own) gets unit scale, not a division by zero.
    scale = np.sqrt(np.where(values[:rank] > 0, values[:rank], 1.0))[:, None]
    vertical = (left.T * scale).reshape(rank, c, kh, 1)
    horizontal = (right_t / scale).reshape(rank, d, kw).transpose(1, 0, 2)[:, :, None, :]
    return vertical.astype(weight.dtype), horizontal.astype(weight.dtype)


def _planar(weight: np.ndarray) -> np.ndarray:
    """A 3-D conv's weight with its ``kh kw`` taps as the rows' and ``kt`` as the columns' axis."""
    if np.ndim(weight) != 5:
        return weight
    d, c, kt, kh, kw = np.shape(weight)
    return np.asarray(weight).reshape(d, c, kt, kh * kw).transpose(0, 1, 3, 2)


def _filter_matrix(weight: np.ndarray) -> np.ndarray:
    w = _validated(weight).astype(np.float64)
    d, c, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(c * kh, d * kw)  # rows (i, y), columns (o, x)


def tucker2(weight: np.ndarray, in_rank: int, out_rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first (r1, c, 1, 1), core (r2, r1, kh, kw), last (d, r2, 1, 1))`` with
    ``W[o, i] ~ sum_{r, s} last[o, r] core[r, s] first[s, i]``."""
    w = _validated(weight).astype(np.float64)
    d, c = w.shape[:2]
    in_rank, out_rank = validate_rank(in_rank, c), validate_rank(out_rank, d)
    out_basis = _top_left_basis(w.reshape(d, -1), out_rank)
    in_basis = _top_left_basis(w.transpose(1, 0, 2, 3).reshape(c, -1), in_rank)
    core = np.einsum("oiyx,or,is->rsyx", w, out_basis, in_basis, optimize=True)
    return (in_basis.T[:, :, None, None].astype(weight.dtype), core.astype(weight.dtype),
            out_basis[:, :, None, None].astype(weight.dtype))


def weight_spectrum(weight: np.ndarray, scheme: str) -> np.ndarray:
    """Squared singular values (descending) of the matrix a scheme truncates: ``d x (c kh kw)`` for
    ``channel`` (weight SVD), ``(c kh) x (d kw)`` for ``spatial`` (filter reconstruction)."""
    w = _validated(weight).astype(np.float64)
    d, c, kh, kw = w.shape
    if scheme == "channel":
        matrix = w.reshape(d, -1)
    elif scheme == "spatial":
        matrix = w.transpose(1, 2, 0, 3).reshape(c * kh, d * kw)
    else:
        raise ValueError(f"unknown factorisation scheme {scheme!r}")
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)  # an energy: the tail's rounding does not matter


def _left_singular_pairs(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every left singular vector of ``matrix`` and its singular value, descending: from the
    eigendecomposition of ``A A^T`` where ``A`` is not taller than wide (VGG's 1536 x 1536
    filter matrix: 0.5 s instead of the SVD's 1.2 s on 2 cores), by SVD otherwise. The vectors
    are orthonormal either way; a value the Gram's rounding leaves below zero is 0."""
    if matrix.shape[0] > matrix.shape[1]:
        left, values, _ = np.linalg.svd(matrix, full_matrices=False)
        return left, values
    squares, vectors = np.linalg.eigh(matrix @ matrix.T)
    return vectors[:, ::-1], np.sqrt(np.clip(squares[::-1], 0.0, None))


def _top_left_basis(matrix: np.ndarray, rank: int) -> np.ndarray:
    return deterministic_signs(top_left_singular_vectors(matrix, rank))


def _validated(weight: np.ndarray) -> np.ndarray:
    w = _finite(weight)
    if w.ndim != 4:
        raise ValueError(f"expected a finite (d, c, kh, kw) conv weight, got shape {w.shape}")
    return w


def _finite(weight: np.ndarray) -> np.ndarray:
    """A layer's weight in the common layout ``(d, c / group, *kernel)``: any kind, any dimension."""
    w = np.asarray(weight)
    if w.ndim < 2 or not np.all(np.isfinite(w)):
        raise ValueError(f"expected a finite (d, c, ...) weight, got shape {w.shape}")
    return w
