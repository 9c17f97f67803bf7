"""Errors in their tiers: onnxruntime refusing the user's model is bad input (exit 2), refusing a
model this tool made is a bug of ours (InternalError, exit 3), and anything else propagates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_lowrank.errors import InternalError, LowRankError, ModelLoadError, ModelRunError
from onnx_lowrank.runtime import sessions
from onnx_lowrank.runtime.sessions import make_session, run
from tests.builders import Layer, conv_net


def unknown_op_model() -> onnx.ModelProto:
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="no.such.domain")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("no.such.domain", 1)])


def test_a_model_onnxruntime_refuses_is_bad_input_when_it_is_the_users_and_a_bug_when_it_is_ours() -> None:
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        make_session(unknown_op_model())
    with pytest.raises(InternalError, match="a model onnx-lowrank made") as raised:
        make_session(unknown_op_model(), produced=True)
    assert not isinstance(raised.value, LowRankError)


def test_a_run_that_fails_is_bad_input_on_the_users_model_and_a_bug_on_ours() -> None:
    session = make_session(conv_net([Layer(8)], size=(8, 8)))
    wrong = {"input": np.zeros((1, 5, 8, 8), np.float32)}  # five channels where the model takes three
    with pytest.raises(ModelRunError):
        run(session, None, wrong)
    with pytest.raises(InternalError):
        run(session, None, wrong, produced=True)


def test_a_fault_that_is_not_onnxruntime_refusing_the_model_is_not_turned_into_bad_input(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(sessions.ort, "InferenceSession", broken)
    with pytest.raises(KeyError):
        make_session(conv_net([Layer(8)], size=(8, 8)))


def test_a_sessions_weights_handed_over_as_arrays_compute_what_the_serialised_model_does() -> None:
    import gc

    import onnxruntime as ort

    from onnx_lowrank.graph.io import weights_apart

    model = conv_net([Layer(16), Layer(512)], size=(8, 8), classifier=5)  # the second conv's weight: 288 KiB
    bias = next(t for t in model.graph.initializer if t.dims == [16])
    model.graph.initializer.append(helper.make_tensor("bf16", TensorProto.BFLOAT16, [40000], [0] * 40000))
    model.graph.node.append(helper.make_node("Cast", ["bf16"], ["bf16_as_float"], to=TensorProto.FLOAT))
    model.graph.initializer.append(helper.make_tensor("unused", TensorProto.FLOAT, [20000], [1.0] * 20000))
    light, arrays = weights_apart(model)
    assert arrays and all(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer if t.name in arrays)
    # a type numpy cannot hold; small; read by nothing (onnxruntime drops it before it could be handed over)
    assert len(arrays) == 1 and not {"bf16", bias.name, "unused"} & set(arrays)
    assert light.ByteSize() < model.ByteSize() - sum(values.nbytes for values in arrays.values()) + 100 * len(arrays)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    session = make_session(model)
    del model, light, arrays
    gc.collect()
    np.testing.assert_array_equal(run(session, None, {"input": x})[0], expected[0])


def test_a_weight_a_sub_graph_reads_is_handed_over_too() -> None:
    import onnxruntime as ort

    from onnx_lowrank.graph.io import weights_apart

    def branch(name: str, node) -> onnx.GraphProto:
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 20000])])

    shift = np.arange(20000, dtype=np.float32).reshape(1, 20000)
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["out"], then_branch=branch("then", helper.make_node("Add", ["x", "shift"], ["y"])),
                          else_branch=branch("else", helper.make_node("Identity", ["x"], ["y"])))],
        "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20000]),
               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 20000])],
        [onnx.numpy_helper.from_array(shift, "shift")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert set(weights_apart(model)[1]) == {"shift"}
    x = np.ones((1, 20000), np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        np.testing.assert_array_equal(run(make_session(model), None, feeds)[0], expected[0])
