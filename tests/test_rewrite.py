"""Graph side: normalisation, unit discovery and the rewrite reproduce the original at full rank."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.rewrite import (
    NodeSpec,
    beside_units,
    channel_chain,
    channel_decomposition,
    replace_units,
    spatial_decomposition,
    tucker2_decomposition,
    whole_layer,
)
from onnx_lowrank.graph.surgery import prefix_model
from onnx_lowrank.graph.units import find_units
from onnx_lowrank.solvers import LowRankFactors
from onnx_lowrank.solvers.activations import apply_activation
from onnx_lowrank.solvers.grouped import fit_per_group
from onnx_lowrank.solvers.weights import spatial_filter_reconstruction, tucker2
from tests.builders import IR_VERSION, Layer, conv_net, relative_error, run_model


def full_rank_rewrite(model: onnx.ModelProto, seed: int = 0):
    """Decompose every decomposable layer with a random orthogonal Q and P = Q (so M = I)."""
    rng = np.random.default_rng(seed)
    normalised = normalise(model)
    units = [u for u in find_units(normalised) if u.decomposable]
    chains = {}
    for unit in units:
        d = unit.weight.shape[0]
        q = fit_per_group(d, unit.group, d, lambda part, rank: orthogonal(rng, rank)).P  # block diagonal if grouped
        chains[unit.name] = channel_chain(unit, q, q, np.zeros(d))
    return replace_units(normalised, chains), units


def orthogonal(rng, size: int) -> LowRankFactors:
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return LowRankFactors(q, q, np.zeros(size))


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


CASES = {
    "stride2": [Layer(8, stride=2), Layer(16, stride=2)],
    "asymmetric-pads": [Layer(8, pads=[0, 1, 2, 1]), Layer(16, pads=[1, 0, 0, 2])],
    "same-upper-stride2": [Layer(8, auto_pad="SAME_UPPER", stride=2), Layer(16, k=4, auto_pad="SAME_UPPER")],
    "same-lower": [Layer(8, k=4, auto_pad="SAME_LOWER"), Layer(16, auto_pad="SAME_LOWER", stride=2)],
    "valid": [Layer(8, auto_pad="VALID"), Layer(16, auto_pad="VALID")],
    "dilation": [Layer(8, dilation=2), Layer(16, dilation=3, pads=[1, 2, 3, 1])],
    "k1": [Layer(8, k=1), Layer(16, k=1)],
    "k5": [Layer(8, k=5), Layer(16, k=5, stride=2)],
    "k7": [Layer(8, k=7), Layer(16, k=7)],
    "non-square": [Layer(8, k=(3, 1)), Layer(16, k=(1, 5))],
    "no-bias": [Layer(8, bias=False), Layer(16, bias=False)],
    "batchnorm": [Layer(8, bn=True, bias=False), Layer(16, bn=True)],
    "mul-add": [Layer(8, mul_add=True), Layer(16, bn=True, mul_add=True)],
    "clip": [Layer(8, act="clip"), Layer(16, act="clip")],
    "leaky": [Layer(8, act="leaky"), Layer(16, act="leaky")],
    "linear": [Layer(8, act="none"), Layer(16, act="none")],
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_full_rank_rewrite_reproduces_outputs(name: str, batch: int) -> None:
    model = conv_net(CASES[name], size=(13, 11))
    rewritten, units = full_rank_rewrite(model)
    x = np.random.default_rng(1).standard_normal((batch, 3, 13, 11)).astype(np.float32)
    (expected,), (actual,) = run_model(model, {"input": x}), run_model(rewritten, {"input": x})
    assert actual.shape == expected.shape
    assert relative_error(expected, actual) < 1e-4
    assert op_count(rewritten, "Conv") == op_count(model, "Conv") + len(units)
    assert op_count(rewritten, "BatchNormalization") == 0
    assert op_count(rewritten, "Mul") == 0 and op_count(rewritten, "Add") == 0


def exact_chain(unit, scheme: str):
    """The chain of ``scheme`` at the rank where it is exact, so the rewritten model must equal the original."""
    d, c, kh, kw = unit.weight.shape
    if scheme == "spatial":
        return spatial_decomposition(unit.attrs, *spatial_filter_reconstruction(unit.weight, min(c * kh, d * kw)),
                                     unit.bias)
    return tucker2_decomposition(unit.attrs, *tucker2(unit.weight, c, d), unit.bias)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"k1"}))
@pytest.mark.parametrize("scheme", ["spatial", "tucker2"])
def test_spatial_and_tucker2_chains_split_strides_pads_and_dilations_exactly(name: str, scheme: str) -> None:
    model = conv_net(CASES[name], size=(13, 11))
    normalised = normalise(model)
    units = [u for u in find_units(normalised) if u.decomposable]
    rewritten = replace_units(normalised, {u.name: exact_chain(u, scheme) for u in units})
    onnx.checker.check_model(rewritten)
    x = np.random.default_rng(4).standard_normal((2, 3, 13, 11)).astype(np.float32)
    (expected,), (actual,) = run_model(model, {"input": x}), run_model(rewritten, {"input": x})
    assert actual.shape == expected.shape
    assert relative_error(expected, actual) < 1e-4
    assert op_count(rewritten, "Conv") == op_count(model, "Conv") + len(units) * (1 if scheme == "spatial" else 2)


def test_reading_or_rewriting_a_model_keeps_no_copy_of_its_weights_once_done(monkeypatch) -> None:
    """graphsurgeon graphs are reference cycles: without the collector (which a run may not call
    for several stages), every weight a graph loaded stays as long as the graph would. Only the
    arrays the units hold may outlive the calls."""
    loaded = []
    load = LazyValues.load
    monkeypatch.setattr(LazyValues, "load", lambda self: (array := load(self), loaded.append(weakref.ref(array)))[0])
    model = conv_net([Layer(8, bn=True), Layer(16), Layer(8)], classifier=4)
    gc.collect()
    gc.disable()
    try:
        normalised = normalise(model)
        units = find_units(normalised)
        held = {id(value) for unit in units for value in (unit.weight, unit.bias, unit.bias_after) if value is not None}
        decomposable = [u for u in units if u.decomposable]
        replace_units(normalised, {u.name: whole_layer(u) for u in decomposable})
        beside_units(normalised, {u.name: whole_layer(u) for u in decomposable})
        alive = [ref() for ref in loaded if ref() is not None]
    finally:
        gc.enable()
    assert len(loaded) > len(held) > 0
    assert [array.shape for array in alive if id(array) not in held] == []


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 50), (6, 4, 5)])
def test_a_chains_first_weights_are_q_transposed_times_w_when_cast_a_block_at_a_time(shape, monkeypatch) -> None:
    from onnx_lowrank.graph import rewrite

    rng = np.random.default_rng(1)
    weight = rng.standard_normal(shape).astype(np.float32)
    q = np.linalg.qr(rng.standard_normal((shape[0], 3)))[0]
    expected = np.tensordot(q.T, weight.astype(np.float64), axes=([1], [0]))
    monkeypatch.setattr(rewrite, "PROJECTION_BLOCK_BYTES", 8 * shape[0] * 3)  # three columns a block
    assert np.allclose(rewrite._projected(q, weight), expected, rtol=1e-12, atol=1e-12)


def test_spatial_split_gives_each_conv_its_own_axis() -> None:
    unit = [u for u in find_units(conv_net([Layer(8, k=(3, 5), stride=2, dilation=2, pads=[1, 2, 3, 4])]))][0]
    vertical, horizontal = exact_chain(unit, "spatial")
    assert vertical.attrs == {"kernel_shape": [3, 1], "strides": [2, 1], "dilations": [2, 1], "pads": [1, 0, 3, 0]}
    assert horizontal.attrs == {"kernel_shape": [1, 5], "strides": [1, 2], "dilations": [1, 2], "pads": [0, 2, 0, 4]}
    assert vertical.bias is None and horizontal.bias is not None


def test_nhwc_model_with_transposes() -> None:
    model = conv_net([Layer(8), Layer(16, stride=2)], size=(10, 10), nhwc=True)
    rewritten, units = full_rank_rewrite(model)
    x = np.random.default_rng(2).standard_normal((2, 10, 10, 3)).astype(np.float32)
    assert len(units) == 2
    assert relative_error(run_model(model, {"input": x})[0], run_model(rewritten, {"input": x})[0]) < 1e-4


def test_rewrite_keeps_interface_opset_and_metadata() -> None:
    model = conv_net([Layer(8), Layer(16)], classifier=5, opset=13)
    onnx.helper.set_model_props(model, {"author": "tests"})
    rewritten, _ = full_rank_rewrite(model)
    onnx.checker.check_model(rewritten)
    assert rewritten.opset_import[0].version == 13
    assert rewritten.ir_version == model.ir_version
    assert rewritten.producer_name == model.producer_name
    assert {p.key: p.value for p in rewritten.metadata_props} == {"author": "tests"}
    assert rewritten.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
    names = [n.name for n in rewritten.graph.node]
    assert len(names) == len(set(names)) and all(names)


def test_low_rank_chain_has_the_planned_shapes() -> None:
    model = conv_net([Layer(8), Layer(16)])
    normalised = normalise(model)
    unit = [u for u in find_units(normalised) if u.decomposable][1]
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))[0][:, :4]
    chain = channel_decomposition(unit.attrs, unit.weight, unit.bias, q, q, np.zeros(16))
    assert [spec.weight.shape for spec in chain] == [(4, 8, 3, 3), (16, 4, 1, 1)]
    assert chain[0].bias is None and chain[1].bias.shape == (16,)
    assert chain[1].attrs == {"kernel_shape": [1, 1]}


def test_batchnorm_folding_is_exact() -> None:
    model = conv_net([Layer(8, bn=True, mul_add=True), Layer(16, bn=True, bias=False)])
    folded = normalise(model)
    x = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert op_count(folded, "BatchNormalization") == 0
    assert relative_error(run_model(model, {"input": x})[0], run_model(folded, {"input": x})[0]) < 1e-5


def test_activations_are_detected() -> None:
    model = conv_net([Layer(8, act="relu"), Layer(8, act="clip"), Layer(8, act="leaky"),
                      Layer(8, act="none", bn=True)])
    units = find_units(normalise(model))
    assert [u.activation.kind for u in units] == ["relu", "clip", "leaky_relu", "none"]
    assert units[1].activation.params == {"min": 0.0, "max": 6.0}
    assert units[2].activation.params == {"alpha": pytest.approx(0.1)}


SMOOTH_AND_HARD = ["silu", "hard_swish", "hard_sigmoid", "tanh", "sigmoid", "gelu"]


@pytest.mark.parametrize("act", SMOOTH_AND_HARD)
def test_more_activations_are_detected_and_match_onnxruntime(act: str) -> None:
    """The detected kind and parameters, applied in NumPy, reproduce what onnxruntime computes."""
    with_act = conv_net([Layer(8, act=act)], opset=20)
    linear = conv_net([Layer(8, act="none")], opset=20)  # same seed: same conv weights
    (unit,) = find_units(normalise(with_act))
    assert unit.activation.kind == act
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32) * 3
    expected = run_model(with_act, {"input": x})[0]
    computed = apply_activation(unit.activation.kind, unit.activation.params, run_model(linear, {"input": x})[0])
    np.testing.assert_allclose(computed, expected, atol=1e-5)


def test_sigmoid_times_something_else_is_not_silu() -> None:
    model = conv_net([Layer(8, act="silu")])
    sigmoid, mul = model.graph.node[-2], model.graph.node[-1]
    mul.input[1] = sigmoid.output[0]  # sigmoid(y)^2: y is read by the Sigmoid alone
    (unit,) = find_units(normalise(model))
    assert unit.activation.kind == "sigmoid"


def test_clip_with_attributes_in_old_opsets() -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, None, None])
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c"], ["y"], min=0.0, max=6.0)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 10)], ir_version=IR_VERSION)
    (unit,) = find_units(normalise(model))
    assert unit.activation.kind == "clip" and unit.activation.params == {"min": 0.0, "max": 6.0}


def test_undecomposable_convs_are_skipped_with_a_reason() -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 8])
    w_in = helper.make_tensor_value_info("w_dynamic", TensorProto.FLOAT, [8, 8, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, None, None])
    inits = [numpy_helper.from_array(np.ones((8, 1, 3, 3), np.float32), "w_dw"),
             numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "w_group"),
             numpy_helper.from_array(np.ones((8, 8, 3, 3), np.float32), "w_ok")]
    nodes = [helper.make_node("Conv", ["input", "w_dw"], ["a"], group=8, pads=[1] * 4, name="dw"),
             helper.make_node("Conv", ["a", "w_group"], ["b"], group=2, pads=[1] * 4, name="grouped"),
             helper.make_node("Conv", ["b", "w_dynamic"], ["c"], pads=[1] * 4, name="dynamic"),
             helper.make_node("Conv", ["c", "w_ok"], ["y"], pads=[1] * 4, name="ok")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, w_in], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    reasons = {u.name: u.skipped_reason for u in find_units(normalise(model))}
    assert reasons == {"dw": "depthwise conv", "grouped": None,
                       "dynamic": "weights are not constant", "ok": None}


def test_prefix_model_computes_the_same_tensor_with_fewer_nodes() -> None:
    model = normalise(conv_net([Layer(8), Layer(16), Layer(16), Layer(16)], classifier=4))
    units = find_units(model)
    prefix = prefix_model(model, [units[1].output])
    assert len(prefix.graph.node) < len(model.graph.node)
    assert {n.name for n in prefix.graph.node if n.op_type == "Conv"} == {units[0].name, units[1].name}
    x = np.random.default_rng(2).standard_normal((2, 3, 12, 12)).astype(np.float32)
    from onnx_lowrank.runtime.sessions import with_outputs
    full = run_model(with_outputs(model, [units[1].output]), {"input": x})[-1]
    np.testing.assert_array_equal(run_model(prefix, {"input": x})[0], full)


def test_a_lower_ranks_chain_zero_padded_and_fed_computes_what_its_own_rewrite_does() -> None:
    """``replace_unit_fed`` at the top rank, fed a lower rank's arrays (``padded_like``), against
    ``replace_units`` at that rank, run by onnxruntime: conv, MatMul and Gemm layers."""
    from onnx_lowrank.graph.rewrite import padded_like, replace_unit_fed

    model = normalise(conv_net([Layer(8), Layer(12, stride=2), Layer(16)], size=(9, 9), dense=((24, "relu"),),
                               classifier=5))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    checked = set()
    for unit in [u for u in find_units(model) if u.decomposable]:
        d = unit.weight.shape[0]
        basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
        chains = {rank: channel_chain(unit, basis[:, :rank], basis[:, :rank], rng.standard_normal(d))
                  for rank in (2, 3, d - 1)}
        fed, names = replace_unit_fed(model, unit.name, chains[d - 1])
        for rank in (2, 3):
            padded = padded_like(chains[rank], chains[d - 1])
            expected = run_model(replace_units(model, {unit.name: chains[rank]}), {"input": x})[0]
            got = run_model(fed, {"input": x, **dict(zip(names, padded))})[0]
            assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)
            assert not np.allclose(got, run_model(fed, {"input": x})[0], rtol=1e-3)  # the feeds were used
        checked.add(unit.kind)
    assert checked == {"conv", "dense"}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_transposed_layers_lower_rank_chain_zero_padded_and_fed_computes_what_its_own_rewrite_does(seed) -> None:
    from onnx_lowrank.graph.rewrite import padded_like, replace_unit_fed
    from tests.test_layer_kinds import conv_transpose

    model, shape = conv_transpose(seed, 2)
    model = normalise(model)
    unit = next(u for u in find_units(model) if u.decomposable)
    rng = np.random.default_rng(seed)
    d = unit.weight.shape[0]
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    chains = {rank: channel_chain(unit, basis[:, :rank], basis[:, :rank], rng.standard_normal(d)) for rank in (1, d)}
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    fed, names = replace_unit_fed(model, unit.name, chains[d])
    expected = run_model(replace_units(model, {unit.name: chains[1]}), {"input": x})[0]
    got = run_model(fed, {"input": x, **dict(zip(names, padded_like(chains[1], chains[d])))})[0]
    assert unit.kind == "transpose" and np.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_chains_that_differ_in_more_than_their_rank_are_not_padded() -> None:
    from onnx_lowrank.graph.rewrite import padded_like

    weight = np.ones((8, 2, 3, 3), np.float32)
    bias = np.zeros(8, np.float32)
    grouped = [channel_decomposition({"group": 2, "kernel_shape": [3, 3]}, weight[:, :1], bias, np.eye(8)[:, :r],
                                     np.eye(8)[:, :r], np.zeros(8)) for r in (2, 4)]
    assert padded_like(grouped[0], grouped[1]) is None
    plain = [channel_decomposition({"kernel_shape": [3, 3]}, weight, bias, np.eye(8)[:, :r], np.eye(8)[:, :r],
                                   np.zeros(8)) for r in (2, 4)]
    assert [a.shape for a in padded_like(plain[0], plain[1])] == [(4, 2, 3, 3), (8, 4, 1, 1), (8,)]
    strided = [NodeSpec(plain[0][0].weight, None, {"kernel_shape": [3, 3], "strides": [2, 2]}), plain[0][1]]
    assert padded_like(strided, plain[1]) is None
