"""Replacing a layer (Conv, ConvTranspose, Gemm, MatMul) by a chain that computes (approximately)
the same response."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph.surgery import export_like, imported

PROJECTION_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class NodeSpec:
    """One node of a replacement chain: its op, weights (in that op's layout), optional bias and
    attributes. A MatMul's bias becomes an Add after it."""

    weight: np.ndarray
    bias: np.ndarray | None
    attrs: dict
    op: str = "Conv"


def channel_chain(unit, P: np.ndarray, Q: np.ndarray, new_bias: np.ndarray) -> list[NodeSpec]:
    """The channel decomposition of any layer kind (``graph.units.Unit``): its own op with the
    weights ``Q^T W`` and d' outputs, then the d' -> d projection ``P`` (a 1 x ... x 1 Conv after a
    conv, a MatMul after a dense layer) with the bias. A MatMul's bias that stays in the graph
    after it (``bias_after``) is taken off the chain's, so the sum is the same."""
    if unit.kind == "dense":
        return dense_decomposition(unit.op, unit.weight, unit.bias, P, Q, new_bias, unit.bias_after)
    if unit.kind == "transpose":
        return transposed_decomposition(unit.attrs, unit.weight, unit.bias, P, Q, new_bias)
    return channel_decomposition(unit.attrs, unit.weight, unit.bias, P, Q, new_bias)


def whole_layer(unit) -> list[NodeSpec]:
    """The layer as one node with its weight and bias: what a chain is timed against."""
    if unit.kind == "dense":
        return [NodeSpec(np.ascontiguousarray(unit.weight.T), unit.bias, {}, "MatMul")]
    if unit.kind == "transpose":
        return [NodeSpec(np.swapaxes(unit.weight, 0, 1), unit.bias, dict(unit.attrs), "ConvTranspose")]
    return [NodeSpec(unit.weight, unit.bias, dict(unit.attrs))]


def _projected(Q: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``Q^T W`` over W's first axis, in float64: ``(d', *W.shape[1:])``. W is cast a block of its
    columns at a time, so a dense layer's weight is never held whole in float64 (VGG-16's fc6:
    822 MB on top of its 411 MB while its chain is built)."""
    matrix = weight.reshape(len(weight), -1)
    projected = np.empty((Q.shape[1], matrix.shape[1]))
    step = max(1, PROJECTION_BLOCK_BYTES // (8 * len(matrix)))
    for start in range(0, matrix.shape[1], step):
        projected[:, start:start + step] = Q.T @ matrix[:, start:start + step].astype(np.float64)
    return projected.reshape((Q.shape[1],) + weight.shape[1:])


def _pushed_bias(P: np.ndarray, Q: np.ndarray, bias: np.ndarray, new_bias: np.ndarray) -> np.ndarray:
    """The original bias pushed through ``M = P Q^T``, plus the solver's: ``P Q^T b_orig + b``."""
    return P @ (Q.T @ bias.astype(np.float64)) + new_bias


def dense_decomposition(op: str, weight: np.ndarray, bias: np.ndarray, P: np.ndarray, Q: np.ndarray,
                        new_bias: np.ndarray, bias_after: np.ndarray | None = None) -> list[NodeSpec]:
    """``x (W^T Q)`` (K -> d') then ``(.) P^T`` (d' -> N) with the bias, as two Gemms for a Gemm
    (its input is 2-D) and two MatMuls otherwise (inputs of any rank)."""
    dtype = weight.dtype
    first = _projected(Q, weight).T
    second_bias = _pushed_bias(P, Q, bias, new_bias)
    if bias_after is not None:
        second_bias = second_bias - bias_after
    keep_bias = op == "Gemm" or np.any(second_bias != 0)
    return [NodeSpec(np.ascontiguousarray(first.astype(dtype)), None, {}, op),
            NodeSpec(np.ascontiguousarray(P.T.astype(dtype)), second_bias.astype(dtype) if keep_bias else None, {}, op)]


def transposed_decomposition(attrs: dict, weight: np.ndarray, bias: np.ndarray, P: np.ndarray, Q: np.ndarray,
                             new_bias: np.ndarray) -> list[NodeSpec]:
    """(ConvTranspose k x k, c -> d') with every attribute kept (strides, pads, output_padding,
    output_shape: channels do not change the output's size), then (1 x 1 Conv, d' -> d) with
    ``P`` and the bias. ``weight`` is in the Unit's (d, c, *k) layout."""
    dtype = weight.dtype
    first = _projected(Q, weight)
    pointwise = _pointwise(P, weight.ndim - 2, dtype)
    return [NodeSpec(np.swapaxes(first, 0, 1).astype(dtype), None, dict(attrs), "ConvTranspose"),
            NodeSpec(pointwise, _pushed_bias(P, Q, bias, new_bias).astype(dtype), {"kernel_shape": [1] * (weight.ndim - 2)})]


def _pointwise(P: np.ndarray, spatial_dims: int, dtype) -> np.ndarray:
    return P.reshape(P.shape + (1,) * spatial_dims).astype(dtype)


def channel_decomposition(attrs: dict, weight: np.ndarray, bias: np.ndarray,
                          P: np.ndarray, Q: np.ndarray, new_bias: np.ndarray) -> list[NodeSpec]:
    """(k x k, c -> d') with weights ``Q^T W`` then (1 x 1, d' -> d) with ``P`` (paper Fig. 1); for
    a 1-D or 3-D conv the same with k or k x k x k, then 1 or 1 x 1 x 1.

    The original bias is pushed through ``M = P Q^T`` into the 1x1 layer: ``P Q^T b_orig + b``.
    """
    dtype = weight.dtype
    first = _projected(Q, weight)
    spatial_dims = weight.ndim - 2
    group = int(attrs.get("group", 1))
    pointwise = {"kernel_shape": [1] * spatial_dims}
    if group == 1:
        first_attrs = {k: v for k, v in attrs.items() if k != "group"}
        return [NodeSpec(first.astype(dtype), None, first_attrs),
                NodeSpec(_pointwise(P, spatial_dims, dtype), _pushed_bias(P, Q, bias, new_bias).astype(dtype),
                         pointwise)]
    # Grouped (solvers.grouped): P and Q are block diagonal, so both convs keep the groups and the
    # 1 x 1 conv's weight is P's diagonal blocks stacked.
    rows, columns = P.shape[0] // group, P.shape[1] // group
    blocks = np.concatenate([P[g * rows:(g + 1) * rows, g * columns:(g + 1) * columns] for g in range(group)])
    return [NodeSpec(first.astype(dtype), None, dict(attrs)),
            NodeSpec(_pointwise(blocks, spatial_dims, dtype), _pushed_bias(P, Q, bias, new_bias).astype(dtype),
                     {**pointwise, "group": group})]


def spatial_decomposition(attrs: dict, vertical: np.ndarray, horizontal: np.ndarray,
                          bias: np.ndarray | None) -> list[NodeSpec]:
    """(kh x 1, c -> d'') with ``vertical`` then (1 x kw, d'' -> d) with ``horizontal`` and the bias
    (Jaderberg et al. 2014, scheme 2); for a 3-D conv (1 x kh x kw) then (kt x 1 x 1). Each conv takes its own axis of the strides, dilations and
    pads: stride (sh, 1) then (1, sw), pads top/bottom then left/right. An ``auto_pad`` of
    SAME_UPPER/SAME_LOWER/VALID is kept on both: along an axis with kernel 1 and stride 1 it pads
    nothing, so each conv pads exactly the axis the original padded."""
    if vertical.ndim == 5:  # (1 x kh x kw) then (kt x 1 x 1)
        first_attrs, second_attrs = split_axes_attrs(attrs, (horizontal.shape[2], *vertical.shape[3:]), (1, 2))
    else:  # (kh x 1) then (1 x kw)
        first_attrs, second_attrs = split_axes_attrs(attrs, (vertical.shape[2], horizontal.shape[3]), (0,))
    return [NodeSpec(vertical, None, first_attrs), NodeSpec(horizontal, bias, second_attrs)]


def split_axes_attrs(attrs: dict, kernel: tuple[int, ...], first_axes: tuple[int, ...]) -> tuple[dict, dict]:
    """Conv attributes of the two parts of a conv split by spatial axes: the first takes the
    kernel, strides, dilations and pads of ``first_axes``, the second those of the others; each is
    1 (pads 0) along the axes it leaves."""
    dims = len(kernel)
    strides, dilations = attrs.get("strides", [1] * dims), attrs.get("dilations", [1] * dims)
    pads = attrs.get("pads", [0] * (2 * dims))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()

    def part(axes: set[int]) -> dict:
        def on(values, neutral):
            return [v if axis in axes else neutral for axis, v in enumerate(values)]
        out = {"kernel_shape": on(kernel, 1), "strides": on(strides, 1), "dilations": on(dilations, 1)}
        if auto_pad != "NOTSET":
            out["auto_pad"] = auto_pad
        else:
            out["pads"] = on(pads[:dims], 0) + on(pads[dims:], 0)
        return out

    return part(set(first_axes)), part(set(range(dims)) - set(first_axes))


def tucker2_decomposition(attrs: dict, first: np.ndarray, core: np.ndarray, last: np.ndarray,
                          bias: np.ndarray | None) -> list[NodeSpec]:
    """(1 x 1, c -> r1) with ``first`` at the input resolution, the (kh x kw, r1 -> r2) ``core`` with
    the original strides/pads/dilations, then (1 x 1, r2 -> d) with ``last`` and the bias. The first
    conv has no bias, so the zero padding of the core sees zeros, as the original did."""
    pointwise = {"kernel_shape": [1, 1]}
    core_attrs = {k: v for k, v in attrs.items() if k != "group"}
    return [NodeSpec(first, None, pointwise), NodeSpec(core, None, core_attrs), NodeSpec(last, bias, pointwise)]


def replace_units(model: onnx.ModelProto, chains: dict[str, list[NodeSpec]]) -> onnx.ModelProto:
    """Return a copy of ``model`` with each named node replaced by its chain (names kept readable);
    the chain reads the node's first input and writes its output."""
    with imported(model) as graph:
        taken = {n.name for n in graph.nodes} | set(graph.tensors())
        for node in [n for n in graph.nodes if n.name in chains]:
            _replace_node(graph, node, chains[node.name], taken)
        return export_like(graph, model)


def replace_unit_fed(model: onnx.ModelProto, name: str, chain: list[NodeSpec]) -> tuple[onnx.ModelProto, list[str]]:
    """``replace_units`` for one node, whose chain's weights and biases are also inputs of the
    model: a run may feed others of the same shapes (the chain at a lower rank, ``padded_like``),
    so that one session serves every rank. Also returns their names, in ``chain_arrays`` order."""
    with imported(model) as graph:
        taken = {n.name for n in graph.nodes} | set(graph.tensors())
        names = _replace_node(graph, next(n for n in graph.nodes if n.name == name), chain, taken)
        fed = export_like(graph, model)
    arrays = dict(zip(names, chain_arrays(chain)))
    # onnxruntime takes an initializer that is also a graph input as a default a run may override.
    fed.graph.input.extend(onnx.helper.make_tensor_value_info(
        tensor, onnx.helper.np_dtype_to_tensor_dtype(arrays[tensor].dtype), arrays[tensor].shape) for tensor in names)
    return fed, names


def chain_arrays(chain: list[NodeSpec]) -> list[np.ndarray]:
    """The chain's weights and biases, node by node (weight, then bias where there is one)."""
    return [array for spec in chain for array in (spec.weight, spec.bias) if array is not None]


def padded_like(chain: list[NodeSpec], top: list[NodeSpec]) -> list[np.ndarray] | None:
    """``chain``'s arrays (``chain_arrays``) zero-padded at the end of each axis to ``top``'s shapes,
    where the two chains differ in their rank alone (``differ_in_rank_alone``): the extra channels
    are zero in the node that writes them and in the one that reads them, so the padded chain
    computes what ``chain`` does. None where they differ otherwise."""
    if not differ_in_rank_alone(chain, top):
        return None
    return [np.pad(value, [(0, limit - size) for size, limit in zip(value.shape, target.shape)])
            for value, target in zip(chain_arrays(chain), chain_arrays(top))]


def differ_in_rank_alone(chain: list[NodeSpec], top: list[NodeSpec]) -> bool:
    """Whether ``chain`` is ``top`` but for smaller sizes of some axes: the same nodes, attributes
    and biases, none grouped (a grouped chain's rank is per group, so its channels are not at the
    end of the axis)."""
    if len(chain) != len(top) or any(
            a.op != b.op or a.attrs != b.attrs or (a.bias is None) != (b.bias is None) or a.attrs.get("group", 1) != 1
            for a, b in zip(chain, top)):
        return False
    return all(value.ndim == target.ndim and all(size <= limit for size, limit in zip(value.shape, target.shape))
               for value, target in zip(chain_arrays(chain), chain_arrays(top)))


def beside_units(model: onnx.ModelProto, chains: dict[str, list[NodeSpec]]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` where each named node keeps its place and its chain runs beside it, from
    the same input; and the tensor each chain writes, by node name. One run of it gives every
    chain's output on the original network's inputs."""
    with imported(model) as graph:
        taken = {n.name for n in graph.nodes} | set(graph.tensors())
        written = {}
        for node in [n for n in graph.nodes if n.name in chains]:
            output = gs.Variable(_unique(f"{node.name}_beside", taken), dtype=node.outputs[0].dtype)
            _append_chain(graph, f"{node.name}_beside", node.inputs[0], output, chains[node.name], taken)
            written[node.name] = output.name
            graph.outputs.append(output)
        return export_like(graph, model), written


def _replace_node(graph: gs.Graph, node: gs.Node, chain: list[NodeSpec], taken: set[str]) -> list[str]:
    """The chain in place of ``node`` (which graphsurgeon's clean-up then drops), reading its first
    input and writing its output; the names of the chain's weights and biases."""
    output = node.outputs[0]
    node.outputs.clear()
    return _append_chain(graph, node.name, node.inputs[0], output, chain, taken)


def _append_chain(graph: gs.Graph, stem_base: str, current: gs.Tensor, output: gs.Tensor, chain: list[NodeSpec],
                  taken: set[str]) -> list[str]:
    """Append the chain's nodes, from ``current`` to ``output``; the names of its weights and
    biases, in ``chain_arrays`` order."""
    constants = []
    for index, spec in enumerate(chain):
        stem = _unique(f"{stem_base}_lowrank{index}", taken)
        last = index == len(chain) - 1
        out = output if last else gs.Variable(_unique(f"{stem}_out", taken), dtype=output.dtype)
        inputs = [current, gs.Constant(_unique(f"{stem}.weight", taken), spec.weight)]
        bias = None if spec.bias is None else gs.Constant(_unique(f"{stem}.bias", taken), spec.bias)
        constants += [tensor.name for tensor in (inputs[1], bias) if tensor is not None]
        if spec.op == "MatMul" and bias is not None:
            product = gs.Variable(_unique(f"{stem}_product", taken), dtype=output.dtype)
            graph.nodes.append(gs.Node("MatMul", name=stem, inputs=inputs, outputs=[product]))
            graph.nodes.append(gs.Node("Add", name=_unique(f"{stem}_bias", taken), inputs=[product, bias],
                                       outputs=[out]))
        else:
            graph.nodes.append(gs.Node(spec.op, name=stem, attrs=dict(spec.attrs),
                                       inputs=inputs + ([bias] if bias is not None else []), outputs=[out]))
        current = out
    return constants


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate
