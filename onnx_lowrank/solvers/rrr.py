"""Reduced-rank regression (paper Eq. 7-8): ``min ||Z - M Y||_F  s.t. rank(M) <= r``.

Closed form: with ``M_hat = Z Y^T (Y Y^T)^{-1}`` the unconstrained least-squares solution, the
optimum is ``M = U_r U_r^T M_hat`` where ``U_r`` are the top left singular vectors of
``M_hat L`` (``L`` the Cholesky factor of ``Y Y^T``): the paper's GSVD with
``V^T Y Y^T V = I``. When ``Z = Y``, ``M_hat = I`` and this is PCA of ``Y``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from onnx_lowrank.solvers.factors import deterministic_signs, validate_rank


def reduced_rank_regression(scatter_yy: np.ndarray, cross_zy: np.ndarray, rank: int,
                            ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q)`` with ``M = P Q^T`` minimising ``||Z - M Y||_F`` for centred Z, Y.

    ``scatter_yy = Y Y^T`` and ``cross_zy = Z Y^T`` are passed instead of the samples so that
    callers computing them once (the alternating solver) do not redo the ``O(n d^2)`` products.
    ``ridge`` (relative to the mean eigenvalue) keeps rank-deficient responses solvable.
    """
    d = scatter_yy.shape[0]
    rank = validate_rank(rank, d)
    shift = ridge * max(float(np.trace(scatter_yy)) / d, np.finfo(float).tiny)
    factor = scipy.linalg.cholesky(scatter_yy + shift * np.eye(d), lower=True)
    # M_hat = Z Y^T (Y Y^T)^-1, computed by two triangular solves instead of an inverse.
    m_hat = scipy.linalg.cho_solve((factor, True), cross_zy.T).T
    left, _, _ = np.linalg.svd(m_hat @ factor, full_matrices=False)
    basis = deterministic_signs(left[:, :rank])
    return basis, m_hat.T @ basis
