"""Replacing a Conv by a chain of Convs that computes (approximately) the same response."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph.surgery import export_like


@dataclass(frozen=True)
class ConvSpec:
    """One Conv of a replacement chain: its weights, optional bias and attributes."""

    weight: np.ndarray
    bias: np.ndarray | None
    attrs: dict


def channel_decomposition(attrs: dict, weight: np.ndarray, bias: np.ndarray,
                          P: np.ndarray, Q: np.ndarray, new_bias: np.ndarray) -> list[ConvSpec]:
    """(k x k, c -> d') with weights ``Q^T W`` then (1 x 1, d' -> d) with ``P`` (paper Fig. 1).

    The original bias is pushed through ``M = P Q^T`` into the 1x1 layer: ``P Q^T b_orig + b``.
    """
    dtype = weight.dtype
    w = weight.astype(np.float64)
    first = np.tensordot(Q.T, w, axes=([1], [0]))
    second_bias = P @ (Q.T @ bias.astype(np.float64)) + new_bias
    first_attrs = {k: v for k, v in attrs.items() if k != "group"}
    pointwise = {"kernel_shape": [1, 1]}
    return [ConvSpec(first.astype(dtype), None, first_attrs),
            ConvSpec(P[:, :, None, None].astype(dtype), second_bias.astype(dtype), pointwise)]


def replace_convs(model: onnx.ModelProto, chains: dict[str, list[ConvSpec]]) -> onnx.ModelProto:
    """Return a copy of ``model`` with each named Conv replaced by its chain (names kept readable)."""
    graph = gs.import_onnx(model)
    taken = {n.name for n in graph.nodes} | set(graph.tensors())
    for node in [n for n in graph.nodes if n.op == "Conv" and n.name in chains]:
        current = node.inputs[0]
        output = node.outputs[0]
        node.outputs.clear()
        chain = chains[node.name]
        for index, spec in enumerate(chain):
            stem = _unique(f"{node.name}_lowrank{index}", taken)
            last = index == len(chain) - 1
            out = output if last else gs.Variable(_unique(f"{stem}_out", taken), dtype=output.dtype)
            inputs = [current, gs.Constant(_unique(f"{stem}.weight", taken), spec.weight)]
            if spec.bias is not None:
                inputs.append(gs.Constant(_unique(f"{stem}.bias", taken), spec.bias))
            graph.nodes.append(gs.Node("Conv", name=stem, attrs=dict(spec.attrs), inputs=inputs, outputs=[out]))
            current = out
    return export_like(graph, model)


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate
