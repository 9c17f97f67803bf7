"""Small ONNX CNNs built with onnx.helper, so the tests need no torch and no downloads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # what this onnxruntime reads; onnx.helper would stamp a newer one


@dataclass
class Layer:
    out: int
    k: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    pads: list[int] | None = None  # None: "same" symmetric padding
    auto_pad: str | None = None
    dilation: int | tuple[int, int] = 1
    bias: bool = True
    bn: bool = False
    mul_add: bool = False
    act: str = "relu"  # relu | clip | leaky | silu | hard_swish | hard_sigmoid | gelu | tanh | sigmoid | none
    group: int = 1
    weight_rank: int | None = None  # plant a low-rank weight matrix


class NetBuilder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, stem: str, value: np.ndarray) -> str:
        name = f"{stem}_{self.count}"
        self.count += 1
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = f"{op.lower()}_{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.count}", **attrs))
        return out

    def conv_layer(self, x: str, c: int, layer: Layer) -> str:
        kh, kw = _pair(layer.k)
        (sh, sw), (dh, dw) = _pair(layer.stride), _pair(layer.dilation)
        fan_in = c // layer.group * kh * kw
        if layer.weight_rank:
            left = self.rng.standard_normal((layer.out, layer.weight_rank))
            right = self.rng.standard_normal((layer.weight_rank, fan_in))
            weight = (left @ right).reshape(layer.out, c // layer.group, kh, kw) / np.sqrt(fan_in * layer.weight_rank)
        else:
            weight = self.rng.standard_normal((layer.out, c // layer.group, kh, kw)) * np.sqrt(2 / fan_in)
        inputs = [x, self.const("w", weight)]
        if layer.bias:
            inputs.append(self.const("b", self.rng.standard_normal(layer.out) * 0.1))
        attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "dilations": [dh, dw]}
        if layer.group != 1:
            attrs["group"] = layer.group
        if layer.auto_pad:
            attrs["auto_pad"] = layer.auto_pad
        else:
            pads = layer.pads if layer.pads is not None else [dh * (kh // 2), dw * (kw // 2)] * 2
            attrs["pads"] = pads
        y = self.node("Conv", inputs, **attrs)
        if layer.bn:
            d = layer.out
            y = self.node("BatchNormalization", [
                y, self.const("gamma", self.rng.uniform(0.5, 1.5, d)), self.const("beta", self.rng.standard_normal(d) * 0.1),
                self.const("mean", self.rng.standard_normal(d) * 0.1), self.const("var", self.rng.uniform(0.5, 2, d))],
                epsilon=1e-3)
        if layer.mul_add:
            y = self.node("Mul", [y, self.const("scale", self.rng.uniform(0.5, 1.5, (1, layer.out, 1, 1)))])
            y = self.node("Add", [self.const("shift", self.rng.standard_normal((layer.out, 1, 1)) * 0.1), y])
        if layer.act == "relu":
            y = self.node("Relu", [y])
        elif layer.act == "clip":
            y = self.node("Clip", [y, self.const("lo", np.array(0.0)), self.const("hi", np.array(6.0))])
        elif layer.act == "leaky":
            y = self.node("LeakyRelu", [y], alpha=0.1)
        elif layer.act == "silu":
            y = self.node("Mul", [self.node("Sigmoid", [y]), y])
        elif layer.act == "hard_sigmoid":
            y = self.node("HardSigmoid", [y], alpha=0.25, beta=0.4)
        elif layer.act == "gelu":
            y = self.node("Gelu", [y], approximate="tanh")
        elif layer.act in ("hard_swish", "tanh", "sigmoid"):
            y = self.node({"hard_swish": "HardSwish", "tanh": "Tanh", "sigmoid": "Sigmoid"}[layer.act], [y])
        return y


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_net(layers: list[Layer], in_channels: int = 3, size: tuple[int, int] = (12, 12), *,
             nhwc: bool = False, dynamic_batch: bool = True, classifier: int = 0, seed: int = 0,
             opset: int = 17, dense: tuple[tuple[int, str], ...] = ()) -> onnx.ModelProto:
    """A chain of conv layers; ``classifier=K`` appends global pooling and a K-way Gemm; ``dense``
    appends global pooling and (width, activation) MatMul + bias layers (activation relu, tanh,
    gelu written out, or none) before it."""
    b = NetBuilder(seed)
    batch = "N" if dynamic_batch else 1
    shape = [batch, *size, in_channels] if nhwc else [batch, in_channels, *size]
    x = "input"
    if nhwc:
        x = b.node("Transpose", [x], perm=[0, 3, 1, 2])
    c = in_channels
    for layer in layers:
        x = b.conv_layer(x, c, layer)
        c = layer.out
    if classifier or dense:
        x = b.node("GlobalAveragePool", [x])
        x = b.node("Flatten", [x])
    for width, act in dense:
        x = b.node("Add", [b.node("MatMul", [x, b.const("dw", b.rng.standard_normal((c, width)) / np.sqrt(c))]),
                           b.const("db", b.rng.standard_normal(width) * 0.1)])
        x = {"relu": lambda: b.node("Relu", [x]), "tanh": lambda: b.node("Tanh", [x]),
             "gelu": lambda: gelu_written_out(b, x, "erf"), "none": lambda: x}[act]()
        c = width
    if classifier:
        x = b.node("Gemm", [x, b.const("fc", b.rng.standard_normal((c, classifier)) / np.sqrt(c)),
                            b.const("fcb", np.zeros(classifier))])
    elif nhwc and not dense:
        x = b.node("Transpose", [x], perm=[0, 2, 3, 1])
    out_shape = [batch, classifier or c] if classifier or dense else [batch, None, None, None]
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, out_shape)]
    graph = helper.make_graph(b.nodes, "test-net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    model.producer_name = "onnx-lowrank-tests"
    onnx.checker.check_model(model)
    return model


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    return float(np.linalg.norm(reference - approximation) / np.linalg.norm(reference))


def finish(b: NetBuilder, output: str, input_shape: list, opset: int = 17) -> onnx.ModelProto:
    """The model of ``b``'s nodes from ``input`` (``input_shape``, first axis the batch) to ``output``."""
    graph = helper.make_graph(b.nodes, "test-net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  input_shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * len(input_shape))],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    return model


def gelu_written_out(b: NetBuilder, y: str, form: str) -> str:
    """GELU as PyTorch exports it at opsets before 20: the erf form, or the tanh approximation."""
    if form == "erf":  # x * 0.5 * (1 + erf(x / sqrt 2))
        inner = b.node("Erf", [b.node("Div", [y, b.const("sqrt2", np.array(np.sqrt(2.0)))])])
        return b.node("Mul", [b.node("Mul", [y, b.node("Add", [inner, b.const("one", np.array(1.0))])]),
                              b.const("half", np.array(0.5))])
    # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
    cube = b.node("Pow", [y, b.const("three", np.array(3.0))])
    inner = b.node("Add", [y, b.node("Mul", [b.const("c", np.array(0.044715)), cube])])
    tanh = b.node("Tanh", [b.node("Mul", [inner, b.const("s", np.array(np.sqrt(2.0 / np.pi)))])])
    half_x = b.node("Mul", [b.const("half", np.array(0.5)), y])
    return b.node("Mul", [half_x, b.node("Add", [b.const("one", np.array(1.0)), tanh])])


def dense_head_with_batchnorm(seed: int = 0, decades: float = 5.0) -> onnx.ModelProto:
    """Two convs, then Gemm -> per-feature Mul/Add (a dense layer's BatchNorm as exporters write
    it) -> ReLU -> Gemm. The first Gemm's features have spreads over ``decades`` decades, which
    the BatchNorm's scales even out, as training leaves them: quantized per tensor, that Gemm's
    output and the Mul's scales break the head (issue 21); folded, the Gemm's output is even."""
    b = NetBuilder(seed)
    x = b.conv_layer("input", 3, Layer(16))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv_layer(x, 16, Layer(32))])])
    scale = 10 ** b.rng.uniform(-decades / 2, decades / 2, 64)
    x = b.node("Gemm", [x, b.const("w1", b.rng.standard_normal((32, 64)) / 6 / scale), b.const("b1", np.zeros(64))])
    x = b.node("Mul", [x, b.const("bn_scale", scale)])
    x = b.node("Relu", [b.node("Add", [x, b.const("bn_shift", b.rng.standard_normal(64) * 0.5)])])
    x = b.node("Gemm", [x, b.const("w2", b.rng.standard_normal((64, 10)) / 8), b.const("b2", np.zeros(10))])
    graph = helper.make_graph(b.nodes, "dense-bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def with_one_huge_input_channel(model: onnx.ModelProto, conv_index: int = 2, factor: float = 1000.0) -> onnx.ModelProto:
    """``model`` computing the same function, with the ``conv_index``-th conv's weights for input
    channel 0 ``factor`` times larger and the conv before it producing that channel ``factor``
    times smaller (ReLU commutes with a positive scale): per-output-channel int8 weights of that
    conv then round every other input channel to a few levels, a weight-side break."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    values = {i.name: i for i in model.graph.initializer}
    before, conv = [n for n in model.graph.node if n.op_type == "Conv"][conv_index - 1:conv_index + 1]

    def scaled(name: str, change) -> None:
        array = numpy_helper.to_array(values[name]).copy()
        change(array)
        values[name].CopyFrom(numpy_helper.from_array(array, name))

    scaled(before.input[1], lambda w: w.__setitem__(0, w[0] / factor))
    scaled(before.input[2], lambda b: b.__setitem__(0, b[0] / factor))
    scaled(conv.input[1], lambda w: w.__setitem__((slice(None), 0), w[:, 0] * factor))
    return model
