"""Finding the linear layers the tool can decompose, and the activation each one feeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph.surgery import constant_value, imported, sole_consumer
from onnx_lowrank.graph.written_out import written_out_activation


@dataclass(frozen=True)
class Activation:
    """The elementwise nonlinearity applied to a layer's response (``kind='none'`` when linear)."""

    kind: str = "none"  # one of onnx_lowrank.solvers.activations.ACTIVATIONS
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class Unit:
    """One constant-weight linear layer of the (normalised) model: a Conv (1-, 2- or 3-D), a
    ConvTranspose, or a dense Gemm/MatMul. ``skipped_reason`` is set when it cannot be decomposed.

    ``weight`` is the layer's matrix in one layout for every kind, ``(d, c / group, *kernel)``:
    row o holds what output channel o computes from its inputs (a ConvTranspose's weight is
    transposed into it, a dense layer's is ``W^T`` of ``x W``). ``bias`` (length d) is all that is
    added to the response ``output``; for a MatMul it is the constant ``Add`` after it
    (``bias_after``), which stays in the graph."""

    name: str
    input: str
    output: str
    weight_shape: tuple[int, ...]
    group: int
    attrs: dict
    op: str = "Conv"
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    bias_after: np.ndarray | None = None
    activation: Activation = field(default_factory=Activation)
    skipped_reason: str | None = None
    in_subgraph: bool = False  # in an If/Loop/Scan body: listed, never measured or decomposed

    @property
    def kind(self) -> str:
        return {"Conv": "conv", "ConvTranspose": "transpose"}.get(self.op, "dense")

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def channel_axis(self) -> int:
        """The response's channel axis: 1 for NC... convs, the last for dense layers."""
        return -1 if self.kind == "dense" else 1

    @property
    def decomposable(self) -> bool:
        return self.skipped_reason is None


LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def find_units(model: onnx.ModelProto) -> list[Unit]:
    """Every linear layer in topological order; the decomposable ones carry their weights and
    activation. A MatMul of two computed tensors (attention) is listed with the reason it stays."""
    with imported(model) as graph:
        graph.toposort()
        units, tensors = [], graph.tensors()
        for node in graph.nodes:
            if node.op not in LAYER_OPS:
                continue
            unit = _dense_unit(graph, node) if node.op in ("Gemm", "MatMul") else _conv_unit(node)
            if unit.decomposable and not np.issubdtype(unit.weight.dtype, np.floating):
                unit.skipped_reason = f"weights are {unit.weight.dtype}, not floating point"
            if unit.decomposable and unit.kind == "dense" and _is_output_head(graph, tensors[unit.output]):
                unit.skipped_reason = OUTPUT_HEAD_REASON
            if unit.decomposable:
                unit.activation = _activation_after(graph, tensors[unit.output])
            else:
                unit.weight = unit.bias = unit.bias_after = None
            units.append(unit)
        units.extend(_subgraph_units(graph))
        return units


OUTPUT_HEAD_REASON = ("output layer (a dense head): left alone, as the first conv is; energy selection "
                      "misjudges what an argmax over its outputs needs (benchmarks/HISTORY.md, issue 13)")
# Ops between a head and the model's output: one input computed, the rest (if any) constant.
_HEAD_TAIL_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                            "Flatten", "Identity", "Cast", "ArgMax", "TopK"})


def _is_output_head(graph: gs.Graph, response: gs.Tensor) -> bool:
    """Whether the model's output is ``response`` or computed from it by ops of one computed
    input (softmax, reshapes): a classifier's head. A layer writing into a residual stream is not
    one (the Add there has two computed inputs)."""
    outputs = {t.name for t in graph.outputs}
    frontier = [response]
    while frontier:
        tensor = frontier.pop()
        if tensor.name in outputs:
            return True
        frontier.extend(out for node in tensor.outputs if node.op in _HEAD_TAIL_OPS for out in node.outputs)
    return False


def _conv_unit(node: gs.Node) -> Unit:
    weight = constant_value(node.inputs[1])
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    bias = constant_value(node.inputs[2]) if has_bias else None
    shape = tuple(weight.shape) if weight is not None else tuple(node.inputs[1].shape or ())
    group = int(node.attrs.get("group", 1))
    transposed = node.op == "ConvTranspose"
    if transposed and len(shape) > 1:  # (c, d / group, *k) -> (d, c, *k)
        shape = (shape[1] * group, shape[0] // group) + shape[2:]
    unit = Unit(name=node.name, input=node.inputs[0].name, output=node.outputs[0].name, weight_shape=shape,
                group=group, attrs=dict(node.attrs), op=node.op)
    unit.skipped_reason = _conv_skip_reason(weight, shape, group, has_bias and bias is None, transposed)
    if unit.decomposable:
        unit.weight = np.swapaxes(weight, 0, 1) if transposed else weight
        unit.bias = bias if bias is not None else np.zeros(unit.weight.shape[0], weight.dtype)
    return unit


def _dense_unit(graph: gs.Graph, node: gs.Node) -> Unit:
    """``y = x W + b`` with W constant: a Gemm whose transB/alpha/beta/C reduce to it, or a MatMul
    by a constant 2-D right operand with an optional constant Add of a per-output bias after it."""
    data, right = node.inputs[0], node.inputs[1]
    matrix = constant_value(right)
    unit = Unit(name=node.name, input=data.name, output=node.outputs[0].name, weight_shape=(), group=1,
                attrs=dict(node.attrs), op=node.op)
    if matrix is None:
        unit.skipped_reason = ("no constant operand: a product of two computed tensors (attention, say)"
                               if constant_value(data) is None else
                               "the constant is the left operand (W x): only x W is decomposed")
        return unit
    if constant_value(data) is not None:
        unit.skipped_reason = "both operands are constant"
        return unit
    if matrix.ndim != 2:
        unit.skipped_reason = f"its constant operand has {matrix.ndim} dimensions, not 2"
        return unit
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            unit.skipped_reason = "Gemm with transA=1: the input is transposed"
            return unit
        matrix = matrix.T if node.attrs.get("transB", 0) else matrix
        matrix = matrix * np.asarray(node.attrs.get("alpha", 1.0), matrix.dtype)
    unit.weight_shape = (matrix.shape[1], matrix.shape[0])
    bias = np.zeros(matrix.shape[1], matrix.dtype)
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        value = _per_output(constant_value(node.inputs[2]), matrix.shape[1])
        if value is None:
            unit.skipped_reason = "Gemm's C is not a constant per-output bias"
            return unit
        bias = value * np.asarray(node.attrs.get("beta", 1.0), matrix.dtype)
    elif node.op == "MatMul":
        add = sole_consumer(graph, node.outputs[0])
        if add is not None and add.op == "Add":
            other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
            value = _per_output(constant_value(other), matrix.shape[1])
            if value is not None:
                bias = unit.bias_after = value.astype(matrix.dtype)
                unit.output = add.outputs[0].name
    unit.weight, unit.bias = np.ascontiguousarray(matrix.T), bias.astype(matrix.dtype)
    return unit


def _per_output(value: np.ndarray | None, outputs: int) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only (or a scalar), as a length-``outputs`` vector."""
    if value is None:
        return None
    if value.size == 1:
        return np.full(outputs, value.reshape(()), dtype=value.dtype)
    if value.shape[-1] == outputs and value.size == outputs:
        return value.reshape(outputs)
    return None


SUBGRAPH_REASON = "inside an If/Loop/Scan body: only layers of the main graph are decomposed"


def _subgraph_units(graph: gs.Graph) -> list[Unit]:
    """Layers in control-flow bodies, listed with the reason they stay as they are."""
    found = []
    for node in graph.nodes:
        for attr in node.attrs.values():
            for body in attr if isinstance(attr, list) else [attr]:
                if isinstance(body, gs.Graph):
                    found += [Unit(name=n.name or f"{node.name}/{n.op}", input=n.inputs[0].name,
                                   output=n.outputs[0].name, weight_shape=tuple(n.inputs[1].shape or ()),
                                   group=int(n.attrs.get("group", 1)), attrs=dict(n.attrs), op=n.op,
                                   skipped_reason=SUBGRAPH_REASON, in_subgraph=True)
                              for n in body.nodes if n.op in LAYER_OPS]
                    found += _subgraph_units(body)
    return found


def _conv_skip_reason(weight: np.ndarray | None, shape: tuple, group: int, computed_bias: bool,
                      transposed: bool) -> str | None:
    if weight is None:
        return "weights are not constant"
    if not 3 <= len(shape) <= 5:
        return f"{len(shape) - 2}-D conv: 1-, 2- and 3-D convs are decomposed"
    if group != 1:
        if transposed:
            return f"grouped ConvTranspose (group={group})"
        if shape[1] == 1:
            return "depthwise conv"
    if computed_bias:
        return "bias is not constant"
    return None


_PLAIN_OPS = {"Relu": "relu", "Tanh": "tanh", "HardSwish": "hard_swish"}


def _activation_after(graph: gs.Graph, response: gs.Tensor) -> Activation:
    """The activation reading ``response`` alone (so the error after it is what the model sees)."""
    written = written_out_activation(graph, response)
    if written is not None:
        return Activation(*written)
    node = sole_consumer(graph, response)
    if node is None:
        return Activation()
    if node.op in _PLAIN_OPS:
        return Activation(_PLAIN_OPS[node.op])
    if node.op == "Sigmoid":
        return Activation("sigmoid")
    if node.op == "LeakyRelu":
        return Activation("leaky_relu", {"alpha": float(node.attrs.get("alpha", 0.01))})
    if node.op == "HardSigmoid":
        return Activation("hard_sigmoid", {"alpha": float(node.attrs.get("alpha", 0.2)),
                                           "beta": float(node.attrs.get("beta", 0.5))})
    if node.op == "Gelu":
        return Activation("gelu", {"tanh_approximation": float(node.attrs.get("approximate", "none") == "tanh")})
    if node.op == "Clip":
        bounds = _clip_bounds(node)
        if bounds is not None:
            return Activation("clip", {"min": bounds[0], "max": bounds[1]})
    return Activation()


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if len(node.inputs) > index and node.inputs[index].name:
            value = constant_value(node.inputs[index])
            if value is None:
                return None
            bounds.append(float(value))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]
