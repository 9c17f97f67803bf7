"""Linear case (paper Eq. 4): PCA of the responses."""

from __future__ import annotations

from onnx_lowrank.solvers.factors import LowRankFactors, ResponseStats, validate_rank


def fit_pca(stats: ResponseStats, rank: int) -> LowRankFactors:
    """Rank-``rank`` minimiser of ``sum_i ||(y_i - y_bar) - M (y_i - y_bar)||^2``.

    ``M = U_r U_r^T`` with ``U_r`` the top eigenvectors of the scatter matrix, so
    ``P = Q = U_r`` and the bias is ``b = y_bar - M y_bar`` (paper Eq. 2).
    """
    rank = validate_rank(rank, stats.dim)
    basis = stats.eigenvectors[:, :rank]
    bias = stats.mean - basis @ (basis.T @ stats.mean)
    return LowRankFactors(P=basis.copy(), Q=basis.copy(), bias=bias)
