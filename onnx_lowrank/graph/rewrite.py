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


def spatial_decomposition(attrs: dict, vertical: np.ndarray, horizontal: np.ndarray,
                          bias: np.ndarray | None) -> list[ConvSpec]:
    """(kh x 1, c -> d'') with ``vertical`` then (1 x kw, d'' -> d) with ``horizontal`` and the bias
    (Jaderberg et al. 2014, scheme 2). Each conv takes its own axis of the strides, dilations and
    pads: stride (sh, 1) then (1, sw), pads top/bottom then left/right. An ``auto_pad`` of
    SAME_UPPER/SAME_LOWER/VALID is kept on both: along an axis with kernel 1 and stride 1 it pads
    nothing, so each conv pads exactly the axis the original padded."""
    vertical_attrs, horizontal_attrs = split_spatial_attrs(attrs, (vertical.shape[2], horizontal.shape[3]))
    return [ConvSpec(vertical, None, vertical_attrs), ConvSpec(horizontal, bias, horizontal_attrs)]


def split_spatial_attrs(attrs: dict, kernel: tuple[int, int]) -> tuple[dict, dict]:
    """Conv attributes of the vertical (kh x 1) and horizontal (1 x kw) halves of a 2-D conv."""
    kh, kw = kernel
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    vertical = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
    horizontal = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad != "NOTSET":
        vertical["auto_pad"] = horizontal["auto_pad"] = auto_pad
    else:
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        vertical["pads"] = [top, 0, bottom, 0]
        horizontal["pads"] = [0, left, 0, right]
    return vertical, horizontal


def tucker2_decomposition(attrs: dict, first: np.ndarray, core: np.ndarray, last: np.ndarray,
                          bias: np.ndarray | None) -> list[ConvSpec]:
    """(1 x 1, c -> r1) with ``first`` at the input resolution, the (kh x kw, r1 -> r2) ``core`` with
    the original strides/pads/dilations, then (1 x 1, r2 -> d) with ``last`` and the bias. The first
    conv has no bias, so the zero padding of the core sees zeros, as the original did."""
    pointwise = {"kernel_shape": [1, 1]}
    core_attrs = {k: v for k, v in attrs.items() if k != "group"}
    return [ConvSpec(first, None, pointwise), ConvSpec(core, None, core_attrs), ConvSpec(last, bias, pointwise)]


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
