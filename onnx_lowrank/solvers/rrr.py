"""Reduced-rank regression (paper Eq. 7-8): ``min ||Z - M Y||_F  s.t. rank(M) <= r``.

Closed form: with ``M_hat = Z Y^T (Y Y^T)^+`` the least-squares solution, the optimum is
``M = U_r U_r^T M_hat`` where ``U_r`` are the top left singular vectors of ``B = Z W^T``, ``W``
the whitened ``Y`` (``W W^T = I``): the paper's GSVD with ``V^T Y Y^T V = I``. When ``Z = Y``
this is PCA of ``Y``.

``Y Y^T`` is eigen-decomposed once; directions with (relatively) negligible variance are
dropped, which makes rank-deficient responses (e.g. a 1x1 conv expanding c to d > c channels,
whose responses span only c dimensions) exact instead of ridge-regularised, and makes every
later product ``m``-dimensional, ``m`` the numerical rank, instead of ``d``-dimensional.
"""

from __future__ import annotations

import numpy as np

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.solvers.factors import deterministic_signs, validate_rank


class ReducedRankRegression:
    """Solver for a fixed input ``Y`` (d channels), given as its scatter ``Y Y^T``.

    ``transform`` (d x m) whitens: ``W = transform^T Y`` has identity scatter.
    """

    def __init__(self, scatter_yy: np.ndarray, rtol: float = 1e-7) -> None:
        if not np.all(np.isfinite(scatter_yy)):
            raise InvalidOptionError("the response scatter matrix has NaN or infinite values",
                                     hint="check the calibration data for NaN or huge values")
        values, vectors = np.linalg.eigh(scatter_yy)
        kept = values > rtol * max(float(values[-1]), np.finfo(float).tiny)
        self.dim = scatter_yy.shape[0]
        self.transform = vectors[:, kept] / np.sqrt(values[kept])

    def solve(self, cross_zy: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(P, Q)`` with ``M = P Q^T``; ``cross_zy = Z Y^T`` for centred ``Z`` and ``Y``."""
        P, whitened_q = self.solve_whitened(cross_zy @ self.transform, rank)
        return P, self.transform @ whitened_q

    def solve_whitened(self, cross_zw: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """From ``B = Z W^T`` (d x m): ``P = U_r`` and ``B^T U_r``, the factor acting on ``W``."""
        rank = validate_rank(rank, self.dim)
        basis = deterministic_signs(_top_left_singular_vectors(cross_zw, rank))
        return basis, cross_zw.T @ basis


def _top_left_singular_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    """Through the small Gram matrix when it is well conditioned enough, by SVD otherwise."""
    if rank <= matrix.shape[1]:
        values, vectors = np.linalg.eigh(matrix.T @ matrix)
        top, top_vectors = values[:-rank - 1:-1], vectors[:, :-rank - 1:-1]
        if top[-1] > 1e-10 * max(float(top[0]), np.finfo(float).tiny):
            return (matrix @ top_vectors) / np.sqrt(top)
    # Fewer useful directions than the rank: the extra columns (zero singular values) are any
    # orthonormal completion, and their factor B^T U is zero.
    left, _, _ = np.linalg.svd(matrix, full_matrices=rank > min(matrix.shape))
    return left[:, :rank]
