"""The fully connected part of the model (Gemm, MatMul), for whole-model FLOP counts."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph.surgery import constant_value


def dense_ops(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(output tensor, inner dimension K) of each Gemm/MatMul whose weight is a constant.

    A product of two computed tensors (attention, say) is left out of the count.
    """
    graph = gs.import_onnx(model)
    ops = []
    for node in graph.nodes:
        if node.op not in ("Gemm", "MatMul"):
            continue
        weight = constant_value(node.inputs[1])
        if weight is None or weight.ndim < 2:
            continue
        if node.op == "Gemm":
            inner = weight.shape[1] if node.attrs.get("transB", 0) else weight.shape[0]
        else:
            inner = weight.shape[-2]
        ops.append((node.outputs[0].name, int(inner)))
    return ops
