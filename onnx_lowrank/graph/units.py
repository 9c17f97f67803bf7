"""Finding the convolutions the tool can decompose, and the activation each one feeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph.surgery import constant_value, sole_consumer


@dataclass(frozen=True)
class Activation:
    """The elementwise nonlinearity applied to a conv's response (``kind='none'`` when linear)."""

    kind: str = "none"  # one of onnx_lowrank.solvers.activations.ACTIVATIONS
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class ConvUnit:
    """One Conv node of the (normalised) model; ``skipped_reason`` is set when it cannot be decomposed."""

    name: str
    input: str
    output: str
    weight_shape: tuple[int, ...]
    group: int
    attrs: dict
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    activation: Activation = field(default_factory=Activation)
    skipped_reason: str | None = None
    in_subgraph: bool = False  # in an If/Loop/Scan body: listed, never measured or decomposed

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def decomposable(self) -> bool:
        return self.skipped_reason is None


def find_conv_units(model: onnx.ModelProto) -> list[ConvUnit]:
    """Every Conv in topological order; the decomposable ones carry their weights and activation."""
    graph = gs.import_onnx(model)
    graph.toposort()
    units = []
    for node in graph.nodes:
        if node.op != "Conv":
            continue
        weight = constant_value(node.inputs[1])
        has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
        bias = constant_value(node.inputs[2]) if has_bias else None
        shape = tuple(weight.shape) if weight is not None else tuple(node.inputs[1].shape or ())
        group = int(node.attrs.get("group", 1))
        unit = ConvUnit(name=node.name, input=node.inputs[0].name, output=node.outputs[0].name, weight_shape=shape,
                        group=group, attrs=dict(node.attrs))
        unit.skipped_reason = _skip_reason(weight, shape, group, has_bias and bias is None)
        if unit.decomposable:
            unit.weight = weight
            unit.bias = bias if bias is not None else np.zeros(weight.shape[0], weight.dtype)
            unit.activation = _activation_after(graph, node.outputs[0])
        units.append(unit)
    units.extend(_subgraph_convs(graph))
    return units


SUBGRAPH_REASON = "inside an If/Loop/Scan body: only convs of the main graph are decomposed"


def _subgraph_convs(graph: gs.Graph) -> list[ConvUnit]:
    """Convs in control-flow bodies, listed with the reason they stay as they are."""
    found = []
    for node in graph.nodes:
        for attr in node.attrs.values():
            for body in attr if isinstance(attr, list) else [attr]:
                if isinstance(body, gs.Graph):
                    found += [ConvUnit(name=n.name or f"{node.name}/Conv", input=n.inputs[0].name,
                                       output=n.outputs[0].name, weight_shape=tuple(n.inputs[1].shape or ()),
                                       group=int(n.attrs.get("group", 1)), attrs=dict(n.attrs),
                                       skipped_reason=SUBGRAPH_REASON, in_subgraph=True)
                              for n in body.nodes if n.op == "Conv"]
                    found += _subgraph_convs(body)
    return found


def _skip_reason(weight: np.ndarray | None, shape: tuple, group: int, computed_bias: bool) -> str | None:
    if weight is None:
        return "weights are not constant"
    if len(shape) != 4:
        return f"{len(shape) - 2}-D conv: only 2-D convs are decomposed"
    if group != 1:
        return "depthwise conv" if group == shape[0] else f"grouped conv (group={group})"
    if computed_bias:
        return "bias is not constant"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weights are {weight.dtype}, not floating point"
    return None


_PLAIN_OPS = {"Relu": "relu", "Tanh": "tanh", "HardSwish": "hard_swish"}


def _activation_after(graph: gs.Graph, response: gs.Tensor) -> Activation:
    """The activation reading ``response`` alone (so the error after it is what the model sees)."""
    silu = _silu_after(graph, response)
    if silu is not None:
        return silu
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


def _silu_after(graph: gs.Graph, response: gs.Tensor) -> Activation | None:
    """SiLU as exporters write it: ``Mul(y, Sigmoid(y))``, with y read by nothing else."""
    if response in graph.outputs or len(response.outputs) != 2:
        return None
    sigmoid = next((n for n in response.outputs if n.op == "Sigmoid"), None)
    mul = next((n for n in response.outputs if n.op == "Mul"), None)
    if sigmoid is None or mul is None or sole_consumer(graph, sigmoid.outputs[0]) is not mul:
        return None
    if {t.name for t in mul.inputs} != {response.name, sigmoid.outputs[0].name}:
        return None
    return Activation("silu")


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
