"""Activations exporters write out in elementwise ops, recognised by what they compute.

GELU ``0.5 x (1 + erf(x / sqrt 2))`` and its tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
x^3)))``, HardSwish ``x clip(x + 3, 0, 6) / 6`` and SiLU ``x sigmoid(x)`` come out of PyTorch,
PaddlePaddle, TensorFlow and JAX in several arrangements (the 0.5 first or last, a Div or a Mul by
1/sqrt 2, Pow or x*x*x). Rather than match each arrangement, each group of elementwise
nodes that reads the response, with scalar constants only, and ends in one tensor (growing one
node at a time, up to a dozen) is evaluated on a grid and compared with both forms.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import scipy.special

from onnx_lowrank.graph.surgery import constant_value
from onnx_lowrank.solvers.activations import apply_activation

_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}
_UNARY = {"Erf": scipy.special.erf, "Tanh": np.tanh, "Sqrt": np.sqrt, "Sigmoid": scipy.special.expit,
          "Relu": lambda x: np.maximum(x, 0.0)}
ELEMENTWISE_OPS = frozenset(_BINARY) | frozenset(_UNARY) | {"Clip"}  # what a written-out activation is made of
# What a group is compared with, in this order: the kinds and parameters of solvers.activations.
CANDIDATES = (("gelu", {"tanh_approximation": 0.0}), ("gelu", {"tanh_approximation": 1.0}), ("silu", {}),
              ("hard_swish", {}))
_GRID = np.linspace(-6.0, 6.0, 241)
_MAX_NODES = 12  # the longest written-out form (tanh with Pow) has 9


def written_out_activation(graph: gs.Graph, response: gs.Tensor) -> tuple[str, dict[str, float]] | None:
    """(kind, parameters) of the activation the nodes reading ``response`` compute (nothing else
    reading their intermediate tensors), else None."""
    if response in graph.outputs or not response.outputs:
        return None
    nodes: list[gs.Node] = []
    values = {response.name: _GRID}
    frontier = list(response.outputs)
    while frontier and len(nodes) < _MAX_NODES:
        node = next((n for n in frontier if _ready(n, values)), None)
        if node is None or node.op not in ELEMENTWISE_OPS:
            return None
        frontier.remove(node)
        result = _evaluate(node, values)
        if result is None:
            return None
        nodes.append(node)
        out = node.outputs[0]
        values[out.name] = result
        frontier.extend(n for n in out.outputs if n not in frontier and n not in nodes)
        if _closed(nodes, response, graph) and (match := _match(result)) is not None:
            return match
    return None


def _ready(node: gs.Node, values: dict) -> bool:
    return all(not t.name or t.name in values or constant_value(t) is not None for t in node.inputs)


def _evaluate(node: gs.Node, values: dict) -> np.ndarray | None:
    args = []
    for tensor in node.inputs:
        if not tensor.name:  # an optional input left out (Clip's min)
            args.append(None)
            continue
        if tensor.name in values:
            args.append(values[tensor.name])
            continue
        constant = constant_value(tensor)
        if constant is None or constant.size != 1:
            return None
        args.append(float(constant.reshape(())))
    with np.errstate(all="ignore"):
        if node.op == "Clip":
            low = node.attrs.get("min", args[1] if len(args) > 1 and args[1] is not None else -np.inf)
            high = node.attrs.get("max", args[2] if len(args) > 2 and args[2] is not None else np.inf)
            return np.clip(args[0], low, high)
        if node.op in _UNARY and len(args) == 1:
            return _UNARY[node.op](args[0])
        if node.op in _BINARY and len(args) == 2:
            return np.broadcast_to(_BINARY[node.op](args[0], args[1]), _GRID.shape)
    return None


def _closed(nodes: list[gs.Node], response: gs.Tensor, graph: gs.Graph) -> bool:
    """The group reads everything that reads the response, and only its last tensor leaves it."""
    members = set(map(id, nodes))
    if any(id(n) not in members for n in response.outputs):
        return False
    for node in nodes[:-1]:
        out = node.outputs[0]
        if out in graph.outputs or any(id(n) not in members for n in out.outputs):
            return False
    return True


def _match(result: np.ndarray) -> tuple[str, dict[str, float]] | None:
    for kind, params in CANDIDATES:
        if np.allclose(result, apply_activation(kind, params, _GRID), rtol=1e-5, atol=1e-5):
            return kind, dict(params)
    return None
