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
"""

from __future__ import annotations

import numpy as np

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.solvers.factors import LowRankFactors, deterministic_signs, validate_rank


def weight_svd(weight: np.ndarray, bias: np.ndarray, rank: int) -> LowRankFactors:
    """``P = Q = U_r`` (top left singular vectors of the weights): the chain computes
    ``U_r U_r^T W x + b``, so the new bias is ``b - U_r U_r^T b``."""
    matrix = _validated(weight).reshape(weight.shape[0], -1).astype(np.float64)
    rank = validate_rank(rank, min(matrix.shape))
    left, _, _ = np.linalg.svd(matrix, full_matrices=False)
    basis = deterministic_signs(left[:, :rank])
    bias = np.asarray(bias, np.float64)
    return LowRankFactors(basis, basis.copy(), bias - basis @ (basis.T @ bias))


def spatial_filter_reconstruction(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(vertical (d'', c, kh, 1), horizontal (d, d'', 1, kw))`` with
    ``W[o, i, y, x] ~ sum_j horizontal[o, j, 0, x] * vertical[j, i, y, 0]``."""
    w = _validated(weight).astype(np.float64)
    d, c, kh, kw = w.shape
    rank = validate_rank(rank, min(c * kh, d * kw))
    matrix = w.transpose(1, 2, 0, 3).reshape(c * kh, d * kw)  # rows (i, y), columns (o, x)
    left, values, _ = np.linalg.svd(matrix, full_matrices=False)
    left = deterministic_signs(left[:, :rank])
    right_t = left.T @ matrix  # diag(s_r) V_r^T, with the signs chosen for left
    scale = np.sqrt(values[:rank])[:, None]
    vertical = (left.T * scale).reshape(rank, c, kh, 1)
    horizontal = (right_t / scale).reshape(rank, d, kw).transpose(1, 0, 2)[:, :, None, :]
    return vertical.astype(weight.dtype), horizontal.astype(weight.dtype)


def _validated(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight)
    if w.ndim != 4 or not np.all(np.isfinite(w)):
        raise InvalidOptionError(f"expected a finite (d, c, kh, kw) conv weight, got shape {w.shape}")
    return w
