"""Shared graphsurgeon helpers: constants, consumers, export that keeps the model's identity."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for anything computed."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading ``tensor``, unless it is also a graph output or read by several nodes."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def name_all_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, non-empty name: the report and --skip refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        base = node.name or f"{node.op}_{index}"
        name, suffix = base, 1
        while name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)


def export_like(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Clean up, sort and export ``graph``, keeping the original's opsets, IR version and metadata."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(original, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    return model
