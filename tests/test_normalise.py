"""Folding constant affine ops into the linear layer beside them (graph.normalise): exact, and
only where exact. onnxruntime runs the model before and after as the independent reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_lowrank.graph.normalise import normalise
from tests.builders import IR_VERSION, NetBuilder, run_model


def model_of(b: NetBuilder, output: str, input_shape: list, output_rank: int) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, "fold", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * output_rank)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def assert_folded_exactly(model: onnx.ModelProto, feeds: np.ndarray, gone: set[str]) -> onnx.ModelProto:
    folded = normalise(model)
    ops = [n.op_type for n in folded.graph.node]
    assert not gone & set(ops), ops
    (expected,), (actual,) = run_model(model, {"input": feeds}), run_model(folded, {"input": feeds})
    assert expected.shape == actual.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    return folded


def wide_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.exp(rng.uniform(-4, 4, n)) * rng.choice([-1, 1], n)  # a BatchNorm's per-feature scale, 3.5 decades


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_mul_and_add_after_a_gemm_fold_into_it(bias: bool, trans_b: int) -> None:
    b = NetBuilder(0)
    k, n = 12, 20
    weight = b.rng.standard_normal((n, k) if trans_b else (k, n))
    inputs = ["input", b.const("w", weight)] + ([b.const("c", b.rng.standard_normal(n))] if bias else [])
    y = b.node("Gemm", inputs, transB=trans_b, alpha=0.7, beta=1.3)
    y = b.node("Mul", [y, b.const("s", wide_scales(b.rng, n))])
    y = b.node("Add", [b.const("t", b.rng.standard_normal((1, n))), y])
    y = b.node("Sub", [y, b.const("u", b.rng.standard_normal(n))])
    y = b.node("Div", [y, b.const("v", b.rng.uniform(0.5, 2.0, n))])
    folded = assert_folded_exactly(model_of(b, y, ["N", k], 2), b.rng.standard_normal((7, k)).astype(np.float32),
                                   {"Mul", "Add", "Sub", "Div"})
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_mul_and_add_after_a_matmul_fold_into_its_weight_and_bias(rank: int, bias: bool) -> None:
    b = NetBuilder(1)
    k, n = 16, 24
    y = b.node("MatMul", ["input", b.const("w", b.rng.standard_normal((k, n)))])
    if bias:
        y = b.node("Add", [y, b.const("bias", b.rng.standard_normal(n))])
    y = b.node("Mul", [y, b.const("s", wide_scales(b.rng, n))])
    y = b.node("Add", [y, b.const("t", b.rng.standard_normal(n))])
    shape = ["N", 5, k][-rank:]
    feeds = b.rng.standard_normal((3, 5, k)[-rank:]).astype(np.float32)
    folded = assert_folded_exactly(model_of(b, y, shape, rank), feeds, {"Mul"})
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]  # the Add left is the layer's bias


def test_batchnorm_after_a_dense_layer_folds_on_2d_outputs_only() -> None:
    for rank in (2, 3):
        b = NetBuilder(2)
        n = 10
        y = b.node("MatMul", ["input", b.const("w", b.rng.standard_normal((8, n)))])
        stats = [b.const(s, v) for s, v in (("g", wide_scales(b.rng, n)), ("b", b.rng.standard_normal(n)),
                                             ("m", b.rng.standard_normal(n)), ("var", b.rng.uniform(0.5, 2, n)))]
        if rank == 3:  # BatchNormalization normalises axis 1: here the sequence, not the features
            stats = [b.const(s, np.ones(4)) for s in "gbmv"]
        y = b.node("BatchNormalization", [y, *stats], epsilon=1e-3)
        feeds = b.rng.standard_normal((3, 4, 8)[-rank:]).astype(np.float32)
        model = model_of(b, y, ["N", 4, 8][-rank:], rank)
        if rank == 2:
            assert_folded_exactly(model, feeds, {"BatchNormalization"})
        else:
            assert "BatchNormalization" in {n.op_type for n in normalise(model).graph.node}


def test_mul_and_add_before_a_dense_layer_fold_into_it() -> None:
    b = NetBuilder(3)
    k, n = 12, 6
    x = b.node("Sub", ["input", b.const("mean", b.rng.standard_normal(k))])
    x = b.node("Div", [x, b.const("std", b.rng.uniform(0.1, 3, k))])
    y = b.node("MatMul", [x, b.const("w", b.rng.standard_normal((k, n)))])  # no bias: folding the shift adds one
    folded = assert_folded_exactly(model_of(b, y, ["N", k], 2), b.rng.standard_normal((5, k)).astype(np.float32),
                                   {"Sub", "Div"})
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_before_a_conv_a_scale_always_folds_a_shift_only_without_padding() -> None:
    for pads, shift_folds in (([0, 0, 0, 0], True), ([1, 1, 1, 1], False)):
        b = NetBuilder(4)
        x = b.node("Mul", [b.const("s", wide_scales(b.rng, 4).reshape(1, 4, 1, 1)), "input"])
        x = b.node("Add", [x, b.const("t", b.rng.standard_normal((4, 1, 1)))])
        y = b.node("Conv", [x, b.const("w", b.rng.standard_normal((6, 2, 3, 3))), b.const("b", np.zeros(6))],
                   kernel_shape=[3, 3], pads=pads, group=2)
        feeds = b.rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
        model = model_of(b, y, ["N", 4, 7, 7], 4)
        if shift_folds:
            assert_folded_exactly(model, feeds, {"Mul", "Add"})
        else:  # the Add stays, so the Mul before it has no conv to fold into
            folded = normalise(model)
            assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Conv"]
            np.testing.assert_allclose(run_model(folded, {"input": feeds})[0], run_model(model, {"input": feeds})[0],
                                       rtol=1e-5, atol=1e-5)


def test_what_is_not_exact_or_not_per_channel_stays() -> None:
    b = NetBuilder(5)
    y = b.node("MatMul", ["input", b.const("w", b.rng.standard_normal((8, 6)))])
    y = b.node("Mul", [y, b.const("rowwise", b.rng.standard_normal((4, 1)))])  # per row, not per output
    y = b.node("Div", [b.const("one", np.ones(6)), y])  # the constant divided by the response
    model = model_of(b, y, ["N", 8], 2)
    assert [n.op_type for n in normalise(model).graph.node] == ["MatMul", "Mul", "Div"]


def test_a_written_out_gelu_before_a_dense_layer_keeps_its_scalar_tail() -> None:
    from tests.builders import gelu_written_out

    b = NetBuilder(6)
    y = b.node("MatMul", ["input", b.const("w1", b.rng.standard_normal((8, 8)))])
    y = gelu_written_out(b, y, "erf")
    y = b.node("MatMul", [y, b.const("w2", b.rng.standard_normal((8, 4)))])
    model = model_of(b, y, ["N", 8], 2)
    assert [n.op_type for n in normalise(model).graph.node] == [n.op_type for n in model.graph.node]


def test_a_model_with_nothing_to_fold_or_name_is_not_copied_and_one_with_an_unnamed_node_is() -> None:
    from tests.builders import Layer, conv_net

    model = conv_net([Layer(8), Layer(4)], size=(8, 8), classifier=3)
    assert all(node.name for node in model.graph.node)
    assert normalise(model) is model
    model.graph.node[1].name = ""
    named = normalise(model)
    assert named is not model and all(node.name for node in named.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(named, {"input": x})[0], run_model(model, {"input": x})[0], rtol=1e-6)


def test_nodes_named_in_place_get_the_names_normalise_gives_them(tmp_path) -> None:
    from onnx_lowrank.graph.surgery import name_nodes_in_place
    from tests.builders import Layer, conv_net

    model = conv_net([Layer(8), Layer(4)], size=(8, 8), classifier=3)
    model.graph.node[1].name = ""
    model.graph.node[3].name = model.graph.node[2].name  # a duplicate
    expected = [node.name for node in normalise(model).graph.node]
    name_nodes_in_place(model)
    assert [node.name for node in model.graph.node] == expected and len(set(expected)) == len(expected)
    assert normalise(model) is model  # named, nothing to fold: no copy
