"""onnx-lowrank: make ONNX CNNs faster by low-rank decomposition of their convolutions.

Zhang, Zou, He & Sun, "Accelerating Very Deep Convolutional Networks for Classification and
Detection" (TPAMI 2016). ``compress`` is the library entry point; ``onnx-lowrank`` the CLI.
The pipeline is imported lazily so that ``onnx_lowrank.solvers`` stays free of onnx/onnxruntime.
"""

from onnx_lowrank.errors import LowRankError

__version__ = "0.1.0"
__all__ = ["LowRankError", "compress", "compress_to_budget", "Budget", "Result", "Report", "__version__"]


def __getattr__(name: str):
    if name in ("compress", "Result"):
        from onnx_lowrank.pipeline import compress as module

        return getattr(module, name)
    if name == "compress_to_budget":
        from onnx_lowrank.pipeline.search import compress_to_budget

        return compress_to_budget
    if name == "Budget":
        from onnx_lowrank.pipeline.budget import Budget

        return Budget
    if name == "Report":
        from onnx_lowrank.output.report import Report

        return Report
    raise AttributeError(f"module 'onnx_lowrank' has no attribute {name!r}")
