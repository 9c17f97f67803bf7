"""Normalisation: fold into each linear layer the constant affine ops that are exact to fold.

After it: BatchNormalization and per-channel ``Mul``/``Add``/``Sub``/``Div`` by constants that
follow a Conv (1-, 2- or 3-D), a Gemm or a MatMul by a constant (with its bias ``Add``) are part of
its weights and bias, and so are those that precede it along its input channels (an ``Add`` before
a padded conv is not: the padding's zeros would not be shifted). A layer's output is then the whole
linear response ``y = W x + b`` whose low-rank structure the solver exploits, the following
activation reads it directly, and INT8 sees one layer instead of a per-feature scale vector it
would round per tensor (the BatchNorm of a dense layer, exported as ``Mul``/``Add``, broke a VGG-16
head that way: benchmarks/HISTORY.md, issue 21).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.errors import ModelLoadError
from onnx_lowrank.graph.surgery import constant_value, export_like, imported, name_all_nodes, sole_consumer
from onnx_lowrank.graph.written_out import ELEMENTWISE_OPS

QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                           "MatMulInteger", "DynamicQuantizeLinear"})
_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    refuse_quantized_or_half(model)
    with imported(model) as graph:
        changed = name_all_nodes(graph)
        for node in [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")]:
            layer = _Affine.of(graph, node)
            if layer is None:
                continue
            while _fold_before(graph, layer):
                pass
            while _fold_after(graph, layer):
                pass
            if layer.changed:
                layer.write(graph)
                changed = True
        # Nothing to fold or name: the model itself (exporting copies every weight: 2.5 s on VGG-16).
        return export_like(graph, model) if changed else model


@dataclass
class _Affine:
    """A linear layer as ``y = x M + b`` along its channel axes: ``matrix`` is a conv's weight
    ``(d, c / group, *k)`` or a dense layer's ``(K, N)``, in its own type until a fold scales it
    by a float64 vector (most layers have nothing to fold: a 400 MB dense weight is not copied
    for nothing); ``bias_add`` is a MatMul's bias node."""

    node: gs.Node
    matrix: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    bias_add: gs.Node | None = None
    changed: bool = False

    @classmethod
    def of(cls, graph: gs.Graph, node: gs.Node) -> "_Affine | None":
        weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or not np.issubdtype(weight.dtype, np.floating) or constant_value(node.inputs[0]) is not None:
            return None
        has_c = len(node.inputs) > 2 and bool(node.inputs[2].name)
        c = constant_value(node.inputs[2]) if has_c else None
        if has_c and c is None:
            return None
        if node.op == "Conv":
            if weight.ndim < 3:
                return None
            return cls(node, weight, None if c is None else c.astype(np.float64), weight.dtype)
        if weight.ndim != 2:
            return None
        if node.op == "MatMul":
            return cls(node, weight, None, weight.dtype)
        if node.attrs.get("transA", 0):
            return None
        matrix = weight.T if node.attrs.get("transB", 0) else weight
        if node.attrs.get("alpha", 1.0) != 1.0:  # a product by 1 would copy a 400 MB weight for nothing
            matrix = matrix * float(node.attrs["alpha"])
        bias = None
        if c is not None:
            bias = _along(c, matrix.shape[1], 2, axis=-1)
            if bias is None:
                return None
            bias = bias * float(node.attrs.get("beta", 1.0))
        return cls(node, matrix, bias, weight.dtype)

    @property
    def is_conv(self) -> bool:
        return self.node.op == "Conv"

    @property
    def outputs(self) -> int:
        return self.matrix.shape[0] if self.is_conv else self.matrix.shape[1]

    @property
    def input_rank(self) -> int | None:
        """The rank of the layer's input (and output); None where the graph does not say."""
        if self.is_conv:
            return self.matrix.ndim
        if self.node.op == "Gemm":
            return 2
        shape = self.node.inputs[0].shape
        return len(shape) if shape is not None else None

    @property
    def output(self) -> gs.Tensor:
        return (self.bias_add or self.node).outputs[0]

    def full_bias(self) -> np.ndarray:
        return self.bias if self.bias is not None else np.zeros(self.outputs)

    def scale_outputs(self, vector: np.ndarray) -> None:
        self.matrix = self.matrix * (vector[(slice(None),) + (None,) * (self.matrix.ndim - 1)] if self.is_conv
                                     else vector[None, :])
        if self.bias is not None:
            self.bias = self.bias * vector

    def scale_inputs(self, vector: np.ndarray) -> None:
        if self.is_conv:
            self.matrix = self.matrix * self._per_weight_input(vector)[(...,) + (None,) * (self.matrix.ndim - 2)]
        else:
            self.matrix = self.matrix * vector[:, None]

    def shift_inputs(self, vector: np.ndarray) -> None:
        """``x + vector`` fed to the layer: ``M vector`` joins the bias."""
        if self.is_conv:
            shift = (self.matrix.reshape(*self.matrix.shape[:2], -1).sum(-1, dtype=np.float64)
                     * self._per_weight_input(vector)).sum(1)
        else:
            shift = vector @ self.matrix
        self.bias = self.full_bias() + shift

    def _per_weight_input(self, vector: np.ndarray) -> np.ndarray:
        """A per-input-channel vector laid out as the weight's ``(d, c / group)``: output channel o
        of group g reads input channels g * c/group ... (g + 1) * c/group - 1."""
        d, per_group = self.matrix.shape[:2]
        group = int(self.node.attrs.get("group", 1))
        return vector.reshape(group, per_group)[np.arange(d) // (d // group)]

    def write(self, graph: gs.Graph) -> None:
        name = self.node.name
        weight = gs.Constant(f"{name}.weight_folded", self.matrix.astype(self.dtype))
        bias = None if self.bias is None else gs.Constant(f"{name}.bias_folded", self.bias.astype(self.dtype))
        if self.node.op == "MatMul":
            self.node.inputs[1] = weight
            if bias is not None:
                self._write_matmul_bias(graph, bias)
            return
        if self.node.op == "Gemm":
            self.node.attrs.update(transB=0, alpha=1.0, beta=1.0)
        self.node.inputs[1] = weight
        if bias is None:
            return
        if len(self.node.inputs) > 2:
            self.node.inputs[2] = bias
        else:
            self.node.inputs.append(bias)

    def _write_matmul_bias(self, graph: gs.Graph, bias: gs.Constant) -> None:
        if self.bias_add is None:  # a shift folded from before the layer needs a bias node
            product = gs.Variable(f"{self.node.name}.product", dtype=self.node.outputs[0].dtype)
            self.bias_add = gs.Node("Add", f"{self.node.name}.bias", inputs=[product, bias],
                                    outputs=list(self.node.outputs))
            self.node.outputs = [product]
            graph.nodes.append(self.bias_add)
            return
        computed = 0 if self.bias_add.inputs[0] is self.node.outputs[0] else 1
        self.bias_add.inputs[1 - computed] = bias


def _constant_operand(node: gs.Node, computed: gs.Tensor) -> np.ndarray | None:
    """The constant operand of a binary affine op whose other operand is ``computed``, as the
    shift (Add, Sub) or scale (Mul, Div) it applies to ``computed``; None for any other form."""
    if node.op not in _AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    if node.inputs[0] is computed:
        value = constant_value(node.inputs[1])
    elif node.inputs[1] is computed and node.op in ("Mul", "Add"):
        value = constant_value(node.inputs[0])
    else:
        return None
    if value is None or not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
        return None
    value = value.astype(np.float64)
    if node.op == "Sub":
        return -value
    if node.op == "Div":
        return None if np.any(value == 0) else 1 / value
    return value


def _along(value: np.ndarray, size: int, rank: int | None, axis: int) -> np.ndarray | None:
    """A constant that broadcasts over a tensor of ``rank`` dimensions along ``axis`` only (1 for
    channels first, -1 for the last) without growing it, or is a scalar, as a length-``size``
    vector. Of a tensor of unknown rank, only a scalar or a vector along the last axis."""
    if value.size == 1 and value.ndim <= (rank if rank is not None else 1):
        return np.full(size, float(value.reshape(())))
    if rank is None:
        return value.astype(np.float64) if axis == -1 and value.shape == (size,) else None
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    at = axis % rank
    if shape[at] == size and all(n == 1 for i, n in enumerate(shape) if i != at):
        return value.reshape(size).astype(np.float64)
    return None


def _fold_after(graph: gs.Graph, layer: _Affine) -> bool:
    follower = sole_consumer(graph, layer.output)
    if follower is None:
        return False
    rank, axis = layer.input_rank, 1 if layer.is_conv else -1
    if follower.op == "BatchNormalization" and len(follower.outputs) == 1:
        if not (layer.is_conv or rank == 2):  # BN normalises axis 1: the features only of a 2-D output
            return False
        stats = [constant_value(t) for t in follower.inputs[1:5]]
        if any(s is None for s in stats):
            return False
        gamma, beta, mean, var = (s.astype(np.float64) for s in stats)
        scale = gamma / np.sqrt(var + follower.attrs.get("epsilon", 1e-5))
        layer.bias = layer.full_bias()
        layer.scale_outputs(scale)
        layer.bias = layer.bias + beta - mean * scale
    else:
        operand = _constant_operand(follower, layer.output)
        vector = None if operand is None else _along(operand, layer.outputs, rank, axis)
        if vector is None:
            return False
        if follower.op in ("Mul", "Div"):
            layer.scale_outputs(vector)
        elif layer.node.op == "MatMul" and layer.bias_add is None and follower.op == "Add":
            # the MatMul's own bias: it stays, and takes in what follows (and a shift folded from before)
            layer.changed = layer.changed or layer.bias is not None
            layer.bias, layer.bias_add = layer.full_bias() + vector, follower
            return True
        else:
            layer.bias = layer.full_bias() + vector
    (layer.bias_add or layer.node).outputs = list(follower.outputs)
    follower.outputs.clear()
    follower.inputs.clear()
    layer.changed = True
    return True


def _fold_before(graph: gs.Graph, layer: _Affine) -> bool:
    tensor = layer.node.inputs[0]
    if len(tensor.inputs) != 1 or sole_consumer(graph, tensor) is not layer.node:
        return False
    producer = tensor.inputs[0]
    computed = next((t for t in producer.inputs if constant_value(t) is None), None)
    operand = None if computed is None else _constant_operand(producer, computed)
    if operand is None or (layer.node.op == "Gemm" and layer.node.attrs.get("transA", 0)):
        return False
    if operand.size == 1 and computed.inputs and computed.inputs[0].op in ELEMENTWISE_OPS:
        return False  # the scalar tail of a written-out activation (GELU's 0.5): recognised, not folded
    channels = layer.matrix.shape[1] * int(layer.node.attrs.get("group", 1)) if layer.is_conv else layer.matrix.shape[0]
    vector = _along(operand, channels, layer.input_rank, 1 if layer.is_conv else -1)
    if vector is None:
        return False
    if producer.op in ("Mul", "Div"):
        layer.scale_inputs(vector)
    elif layer.is_conv and not _unpadded(layer.node):
        return False
    else:
        layer.shift_inputs(vector)
    layer.node.inputs[0] = computed
    producer.outputs.clear()
    producer.inputs.clear()
    layer.changed = True
    return True


def _unpadded(conv: gs.Node) -> bool:
    return conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(conv.attrs.get("pads", []))


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
