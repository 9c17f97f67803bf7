"""Low-rank response solvers: pure NumPy/SciPy, no ONNX.

A solver sees sampled responses ``y`` (n x d, pre-activation, original bias included) of one
convolution and returns :class:`LowRankFactors` ``(P, Q, b)`` such that the approximated
pre-activation response is ``P @ Q.T @ y + b``. The graph side turns that into the
(k x k, c -> d') conv with weights ``Q.T @ W`` followed by the (1 x 1, d' -> d) conv ``P``.
"""

from onnx_lowrank.solvers.factors import LowRankFactors, ResponseStats
from onnx_lowrank.solvers.pca import fit_pca

__all__ = ["LowRankFactors", "ResponseStats", "fit_pca"]
