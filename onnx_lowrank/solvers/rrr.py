"""Reduced-rank regression (paper Eq. 7-8): ``min ||Z - M Y||_F  s.t. rank(M) <= r``.

Closed form: with ``M_hat = Z Y^T (Y Y^T)^{-1}`` the unconstrained least-squares solution, the
optimum is ``M = U_r U_r^T M_hat`` where ``U_r`` are the top left singular vectors of
``B = M_hat L`` (``L`` the Cholesky factor of ``Y Y^T``): the paper's GSVD with
``V^T Y Y^T V = I``. When ``Z = Y``, ``M_hat = I`` and this is PCA of ``Y``.

``B = Z Y^T L^{-T}`` needs one triangular solve, and ``U_r`` are the top eigenvectors of the
``d x d`` matrix ``B B^T``, so a solve costs ``O(d^3)`` with the factor of ``Y Y^T`` computed once.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.solvers.factors import deterministic_signs, validate_rank


class ReducedRankRegression:
    """Solver for a fixed ``Y``: factorises ``Y Y^T`` once, then solves for any ``Z Y^T``.

    ``ridge`` (relative to the mean eigenvalue of ``Y Y^T``) keeps rank-deficient responses
    solvable.
    """

    def __init__(self, scatter_yy: np.ndarray, ridge: float = 1e-6) -> None:
        d = scatter_yy.shape[0]
        scale = max(float(np.trace(scatter_yy)) / d, np.finfo(float).tiny)
        # Rank-deficient responses can leave eigenvalues a rounding error below zero: grow the
        # ridge until the factorisation exists.
        for shift in ridge * scale * 10.0 ** np.arange(0, 8, 2):
            try:
                self.factor = scipy.linalg.cholesky(scatter_yy + shift * np.eye(d), lower=True)
                return
            except np.linalg.LinAlgError:
                continue
        raise InvalidOptionError("the response scatter matrix is not positive semi-definite",
                                 hint="check the calibration data for NaN or huge values")

    def solve(self, cross_zy: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(P, Q)`` with ``M = P Q^T``; ``cross_zy = Z Y^T`` for centred ``Z`` and ``Y``."""
        d = self.factor.shape[0]
        rank = validate_rank(rank, d)
        whitened = scipy.linalg.solve_triangular(self.factor, cross_zy.T, lower=True).T  # B = Z Y^T L^-T
        _, vectors = np.linalg.eigh(whitened @ whitened.T)  # ascending; LAPACK's full solve beats a subset one
        basis = deterministic_signs(vectors[:, :-rank - 1:-1])
        # Q = M_hat^T U_r = L^-T B^T U_r
        return basis, scipy.linalg.solve_triangular(self.factor.T, whitened.T @ basis, lower=False)

