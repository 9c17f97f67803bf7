"""Property-based: over random small conv graphs (kernels 1-7 and rectangular, strides, pads, dilations,
auto_pad, groups, NHWC transposes, every supported activation, BN/Mul/Add to fold, fixed or dynamic
batch, a tail of dense MatMul layers) a full-rank rewrite reproduces the original, and no graph makes the tool fail,
for any method, other than by a speedup it cannot reach or a model with nothing it can decompose."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onnx_lowrank import compress
from onnx_lowrank.errors import InfeasibleTargetError, NothingToDecomposeError
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.rewrite import channel_chain, channel_decomposition, replace_units, spatial_decomposition
from onnx_lowrank.graph.units import find_units
from onnx_lowrank.solvers.weights import spatial_filter_reconstruction
from tests.builders import Layer, conv_net, relative_error, run_model

pytestmark = pytest.mark.slow  # end-to-end budget searches / many generated graphs

ACTIVATIONS = ["relu", "clip", "leaky", "silu", "hard_swish", "hard_sigmoid", "gelu", "tanh", "sigmoid", "none"]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _output_size(size: int, k: int, stride: int, dilation: int, pads: tuple[int, int] | None, auto_pad: str) -> int:
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-size // stride)
    before, after = pads if auto_pad == "NOTSET" else (0, 0)
    return (size + before + after - dilation * (k - 1) - 1) // stride + 1


@st.composite
def layers(draw, channels: int, size: tuple[int, int]) -> tuple[Layer, tuple[int, int]]:
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = [draw(st.integers(0, k - 1)) for k in kernel for _ in range(2)]  # (top, bottom, left, right)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # onnxruntime supports SAME only without dilation
        dilation = (1, 1)
    out_channels = draw(st.integers(2, 12))
    divisors = [g for g in range(1, min(channels, out_channels) + 1) if channels % g == 0 and out_channels % g == 0]
    group = draw(st.sampled_from(divisors)) if draw(st.booleans()) else 1
    out = tuple(_output_size(n, k, s, d, (pads[2 * axis], pads[2 * axis + 1]), auto_pad)
                for axis, (n, k, s, d) in enumerate(zip(size, kernel, stride, dilation)))
    assume(min(out) >= 1)
    layer = Layer(out_channels, k=kernel, stride=stride, dilation=dilation,
                  pads=None if auto_pad != "NOTSET" else [pads[0], pads[2], pads[1], pads[3]],
                  auto_pad=None if auto_pad == "NOTSET" else auto_pad, bias=draw(st.booleans()),
                  bn=draw(st.booleans()), mul_add=draw(st.booleans()), act=draw(st.sampled_from(ACTIVATIONS)),
                  group=group)
    return layer, out


@st.composite
def conv_graphs(draw) -> tuple[onnx.ModelProto, np.ndarray]:
    channels = draw(st.sampled_from([1, 3, 4]))
    size = (draw(st.integers(5, 12)), draw(st.integers(5, 12)))
    nhwc, dynamic = draw(st.booleans()), draw(st.booleans())
    built, c, current = [], channels, size
    for _ in range(draw(st.integers(1, 3))):
        layer, current = draw(layers(c, current))
        built.append(layer)
        c = layer.out
    dense = tuple((draw(st.integers(2, 12)), draw(st.sampled_from(["relu", "tanh", "gelu", "none"])))
                  for _ in range(draw(st.integers(0, 2))))
    model = conv_net(built, in_channels=channels, size=size, nhwc=nhwc, dynamic_batch=dynamic,
                     seed=draw(st.integers(0, 100)), opset=20 if any(l.act == "gelu" for l in built) else 17,
                     dense=dense)
    batch = 3 if dynamic else 1
    shape = (batch, *size, channels) if nhwc else (batch, channels, *size)
    return model, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def full_rank_chains(model: onnx.ModelProto, split: bool) -> dict:
    """Every decomposable conv as a channel decomposition at d' = d (P = Q = I), after a full-rank
    k x 1 / 1 x k split where ``split``: exactly the original function."""
    chains = {}
    for unit in find_units(model):
        if not unit.decomposable:
            continue
        d = unit.weight.shape[0]
        identity, zeros = np.eye(d), np.zeros(d)
        if unit.kind == "dense":
            chains[unit.name] = channel_chain(unit, identity, identity, zeros)
            continue
        _, c, kh, kw = unit.weight.shape
        if split and kh > 1 and kw > 1 and unit.group == 1:  # the tool never splits a grouped conv
            vertical, horizontal = spatial_decomposition(
                unit.attrs, *spatial_filter_reconstruction(unit.weight, min(c * kh, d * kw)), unit.bias)
            chains[unit.name] = [vertical] + channel_decomposition(horizontal.attrs, horizontal.weight,
                                                                   horizontal.bias, identity, identity, zeros)
        else:
            chains[unit.name] = channel_decomposition(unit.attrs, unit.weight, unit.bias, identity, identity, zeros)
    return chains


@PROPERTY
@given(graph=conv_graphs(), split=st.booleans())
def test_a_full_rank_rewrite_reproduces_the_original(graph, split) -> None:
    model, x = graph
    normalised = normalise(model)
    rewritten = replace_units(normalised, full_rank_chains(normalised, split))
    onnx.checker.check_model(rewritten)
    reference = run_model(model, {"input": x})[0]
    assert relative_error(reference, run_model(rewritten, {"input": x})[0]) < 1e-4 or \
        np.abs(reference - run_model(rewritten, {"input": x})[0]).max() < 1e-5


@PROPERTY
@given(graph=conv_graphs(), method=st.sampled_from(["asymmetric", "asym3d", "linear", "svd"]),
       speedup=st.sampled_from([1.1, 1.5, 3.0]))
def test_no_graph_makes_the_tool_fail_other_than_with_a_lowrank_error(graph, method, speedup) -> None:
    model, x = graph
    calibration = np.concatenate([x] * 8)[:12] if x.shape[0] > 1 else np.concatenate([x] * 12)
    try:
        result = compress(model, speedup, calibration=calibration, method=method, bench=False, rank_multiple=1,
                          num_images=10, holdout=2, threads=1)
    except (InfeasibleTargetError, NothingToDecomposeError):  # what a valid model and options may meet
        return
    out = run_model(result.model, {"input": x})[0]
    assert out.shape == run_model(model, {"input": x})[0].shape and np.all(np.isfinite(out))
