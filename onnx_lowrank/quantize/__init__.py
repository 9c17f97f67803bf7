"""INT8 on top of the low-rank model: onnxruntime's static quantizer (``quantizer``), the accuracy
guard that keeps the nodes INT8 breaks in float (``guard``), and the run's INT8 stages (``stages``)."""

from onnx_lowrank.quantize.guard import Guarded, KeptFloat, Verdict, guard_int8
from onnx_lowrank.quantize.quantizer import Int8Quantizer, SourceReader, quantized_nodes
from onnx_lowrank.quantize.stages import Tolerance, add_int8, int8_of

__all__ = ["Guarded", "Int8Quantizer", "KeptFloat", "SourceReader", "Tolerance", "Verdict", "add_int8",
           "guard_int8", "int8_of", "quantized_nodes"]
