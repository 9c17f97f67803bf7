"""Normalisation: fold BatchNormalization and per-channel Mul/Add constants into the Conv (1-, 2- or
3-D) before them.

After folding, a Conv's output is the whole linear response ``y = W x + b`` whose low-rank
structure the solver exploits, and the following activation reads it directly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.errors import ModelLoadError
from onnx_lowrank.graph.surgery import constant_value, export_like, name_all_nodes, sole_consumer


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                           "MatMulInteger", "DynamicQuantizeLinear"})


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    refuse_quantized_or_half(model)
    graph = gs.import_onnx(model)
    name_all_nodes(graph)
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        while _fold_next(graph, conv):
            pass
    return export_like(graph, model)


def _conv_weight_and_bias(conv: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    weight = constant_value(conv.inputs[1])
    if weight is None or weight.ndim < 3:
        return None
    bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if bias is None and len(conv.inputs) > 2 and conv.inputs[2].name:
        return None
    if bias is None:
        bias = np.zeros(weight.shape[0], dtype=weight.dtype)
    return weight, bias


def _per_channel(value: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts over an N x C x ... tensor of ``rank`` dimensions only along C (or
    is a scalar), as a length-C vector."""
    if value is None or value.ndim > rank:
        return None
    if value.size == 1:
        return np.full(channels, value.reshape(()), dtype=np.float64)
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[1] == channels and shape[0] == 1 and all(n == 1 for n in shape[2:]):
        return value.reshape(channels).astype(np.float64)
    return None


def _fold_next(graph: gs.Graph, conv: gs.Node) -> bool:
    params = _conv_weight_and_bias(conv)
    follower = sole_consumer(graph, conv.outputs[0])
    if params is None or follower is None:
        return False
    weight, bias = params
    d = weight.shape[0]
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    per_output = (slice(None),) + (None,) * (weight.ndim - 1)
    if follower.op == "BatchNormalization" and len(follower.outputs) == 1:
        stats = [constant_value(t) for t in follower.inputs[1:5]]
        if any(s is None for s in stats):
            return False
        gamma, beta, mean, var = (s.astype(np.float64) for s in stats)
        scale = gamma / np.sqrt(var + follower.attrs.get("epsilon", 1e-5))
        w, b = w * scale[per_output], (b - mean) * scale + beta
    elif follower.op in ("Mul", "Add"):
        other = follower.inputs[1] if follower.inputs[0] is conv.outputs[0] else follower.inputs[0]
        vector = _per_channel(constant_value(other), d, weight.ndim)
        if vector is None:
            return False
        if follower.op == "Mul":
            w, b = w * vector[per_output], b * vector
        else:
            b = b + vector
    else:
        return False
    _set_conv_params(conv, w.astype(weight.dtype), b.astype(weight.dtype))
    conv.outputs = list(follower.outputs)
    follower.outputs.clear()
    return True


def _set_conv_params(conv: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    conv.inputs[1] = gs.Constant(f"{conv.name}.weight_folded", weight)
    bias_tensor = gs.Constant(f"{conv.name}.bias_folded", bias)
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias_tensor
    else:
        conv.inputs.append(bias_tensor)


def refuse_quantized_or_half(model: onnx.ModelProto) -> None:
    """The decomposition needs float32 weights it can read: a model that is already quantized or in
    float16 is refused rather than decomposed into something silently broken."""
    ops = {n.op_type for n in model.graph.node} & QUANTIZED_OPS
    if ops:
        raise ModelLoadError(f"the model is already quantized ({', '.join(sorted(ops))} nodes)",
                             hint="decompose the float model, then quantize it with --quantize int8")
    half = [i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT16,
                                                                      onnx.TensorProto.BFLOAT16)]
    if half:
        raise ModelLoadError(f"the model has 16-bit float weights ({half[0]!r} and {len(half) - 1} more)",
                             hint="decompose the float32 model, then convert the result to float16")
