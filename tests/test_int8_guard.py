"""The INT8 accuracy guard (issue 21): models INT8 breaks on the weight side and on the
activation side, found by measurement and kept within the tolerance; every figure is checked
against onnxruntime run here on the held-out samples."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lowrank import compress
from onnx_lowrank.quantize import Int8Quantizer, SourceReader, Verdict, guard_int8
from onnx_lowrank.quantize.guard import max_evaluations
from onnx_lowrank.runtime.calibration import model_inputs, open_calibration
from tests.builders import (
    Layer,
    conv_net,
    dense_head_with_batchnorm,
    relative_error,
    run_model,
    with_one_huge_input_channel,
)

TOLERANCE = 0.05


def guarded(model: onnx.ModelProto, data: np.ndarray):
    """The guard on ``model`` with calibration ``data[:64]``, held-out ``data[64:]``."""
    calibration, held_out = data[:64], {"input": data[64:]}
    reference = run_model(model, held_out)[0]
    ranking = {"input": calibration[:32]}
    float_ranking = run_model(model, ranking)[0]

    def accept(candidate):
        error = relative_error(reference, run_model(candidate, held_out)[0])
        return Verdict(error, error <= TOLERANCE, {})

    reader = SourceReader(open_calibration(calibration, model_inputs(model)), list(range(64)), 16)
    with Int8Quantizer(model, reader) as quantizer:
        return guard_int8(quantizer, accept, lambda m: relative_error(float_ranking, run_model(m, ranking)[0]))


def node_ops(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node}


def reads_int8(model: onnx.ModelProto, node: str) -> bool:
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return bool(dequantized.intersection(next(n for n in model.graph.node if n.name == node).input))


def test_a_dense_head_int8_breaks_on_its_activations_is_restored_within_the_tolerance() -> None:
    model = dense_head_with_batchnorm()
    data = np.random.default_rng(1).standard_normal((96, 3, 12, 12)).astype(np.float32)
    result = guarded(model, data)
    reference = run_model(model, {"input": data[64:]})[0]
    assert relative_error(reference, run_model(result.unguarded, {"input": data[64:]})[0]) > 0.3  # broken
    assert relative_error(reference, run_model(result.model, {"input": data[64:]})[0]) <= TOLERANCE
    ops = node_ops(model)
    assert result.kept_float and {ops[name] for name in result.kept_float} <= {"Mul", "Add", "Gemm"}
    assert all(kept.reason == "activation noise" for kept in result.kept_float.values())
    convs = [name for name, op in node_ops(result.model).items() if op == "Conv"]
    assert convs and all(reads_int8(result.model, conv) for conv in convs)  # the rest stayed int8
    assert result.evaluations <= max_evaluations(result.ranked)


def test_a_conv_whose_weights_int8_breaks_is_found_and_blamed_on_weight_rounding() -> None:
    model = with_one_huge_input_channel(conv_net([Layer(16), Layer(32), Layer(32), Layer(16)], size=(10, 10),
                                                 classifier=5))
    data = np.random.default_rng(2).standard_normal((96, 3, 10, 10)).astype(np.float32)
    result = guarded(model, data)
    reference = run_model(model, {"input": data[64:]})[0]
    assert result.unguarded_verdict.value > 0.3
    assert relative_error(reference, run_model(result.model, {"input": data[64:]})[0]) <= TOLERANCE
    huge = [n.name for n in model.graph.node if n.op_type == "Conv"][2]
    assert result.kept_float[huge].reason == "weight rounding"
    assert max(result.kept_float.values(), key=lambda k: k.damage) is result.kept_float[huge]


def test_a_model_int8_does_not_break_costs_one_measurement() -> None:
    model = conv_net([Layer(16), Layer(32), Layer(16)], size=(10, 10), classifier=5)
    data = np.random.default_rng(3).standard_normal((96, 3, 10, 10)).astype(np.float32)
    result = guarded(model, data)
    assert result.model is result.unguarded and not result.kept_float
    assert result.evaluations == 1 and result.ranked == 0


def test_the_prefix_search_is_bounded_and_finds_the_smallest_passing_prefix() -> None:
    from onnx_lowrank.quantize.guard import _smallest_passing_prefix

    for size in (1, 2, 7, 64, 100):
        for needed in range(1, size + 1):
            measured = []

            def measure(count: int):
                measured.append(count)
                return None, Verdict(0.0, count >= needed, {})

            count, _ = _smallest_passing_prefix(list(range(size)), measure)
            assert count == needed and len(measured) + 1 <= max_evaluations(size)
        assert _smallest_passing_prefix(list(range(size)), lambda count: (None, Verdict(1.0, False, {}))) is None


def test_compress_folds_the_dense_batchnorm_so_int8_needs_no_float_node() -> None:
    model = dense_head_with_batchnorm()
    data = np.random.default_rng(4).standard_normal((120, 3, 12, 12)).astype(np.float32)
    evaluation = np.random.default_rng(5).standard_normal((40, 3, 12, 12)).astype(np.float32)
    result = compress(model, 1.5, calibration=data, evaluation=evaluation, quantize="int8", bench=False,
                      rank_multiple=4, threads=1)
    assert not {"Mul", "Add"} & set(node_ops(result.model).values())  # folded into the Gemm before them
    assert result.report.int8["written"] == "int8" and result.report.int8["kept_float"] == {}
    reference = run_model(model, {"input": evaluation})[0]
    stages = {s["stage"]: s for s in result.report.stages}
    lowrank_error = next(iter(stages["low-rank"]["fidelity"]["output_rel_error"].values()))
    written_error = relative_error(reference, run_model(result.model, {"input": evaluation})[0])
    assert written_error - lowrank_error <= TOLERANCE


def huge_channel_run(**options):
    model = with_one_huge_input_channel(conv_net([Layer(16), Layer(32), Layer(32), Layer(16)], size=(10, 10),
                                                 classifier=5))
    huge = [n.name for n in model.graph.node if n.op_type == "Conv"][2]
    data = np.random.default_rng(6).standard_normal((120, 3, 10, 10)).astype(np.float32)
    evaluation = np.random.default_rng(7).standard_normal((40, 3, 10, 10)).astype(np.float32)
    result = compress(model, 1.5, calibration=data, evaluation=evaluation, quantize="int8", skip=huge, threads=1,
                      rank_multiple=4, **options)
    return model, huge, evaluation, result


def test_compress_reports_the_nodes_kept_in_float_with_their_reason() -> None:
    model, huge, evaluation, result = huge_channel_run(bench=False)
    int8 = result.report.int8
    assert int8["written"] == "int8" and int8["kept_float"][huge]["reason"] in ("weight rounding", "activation noise")
    assert int8["guard"]["held_out_evaluations"] <= int8["guard"]["held_out_evaluations_bound"]
    stages = {s["stage"]: s for s in result.report.stages}
    assert stages["low-rank + int8"]["written"] and stages["low-rank + int8"]["kept_float"] == len(int8["kept_float"])
    assert "low-rank + int8, all nodes" in stages  # what the exclusions buy, beside them
    reference = run_model(model, {"input": evaluation})[0]
    written = relative_error(reference, run_model(result.model, {"input": evaluation})[0])
    all_int8 = next(iter(stages["low-rank + int8, all nodes"]["fidelity"]["output_rel_error"].values()))
    lowrank = next(iter(stages["low-rank"]["fidelity"]["output_rel_error"].values()))
    assert written - lowrank <= TOLERANCE < all_int8 - lowrank
    assert not reads_int8(result.model, huge)


@pytest.mark.parametrize("guarded_ms, written", [(0.5, "int8"), (2.0, "float")])
def test_an_int8_model_with_nodes_in_float_is_written_only_if_it_measures_faster(monkeypatch, guarded_ms, written):
    """Each stage's latency as measured (here set): a guarded model slower than the float one is not worth it."""
    def timed(models, feeds, **kwargs):
        names = {id(m): n for n, m in stage_models.items()}
        return [np.full(15, guarded_ms if names.get(id(m)) == "guarded" else 1.0) for m in models]

    import onnx_lowrank.quantize.stages as stages_module
    stage_models = {}
    real_stage = stages_module._stage

    def remembered(name, model, *args, **kwargs):
        if name == "low-rank + int8":
            stage_models["guarded"] = model
        return real_stage(name, model, *args, **kwargs)

    monkeypatch.setattr(stages_module, "interleaved_times", timed)
    monkeypatch.setattr(stages_module, "_stage", remembered)
    _, _, _, result = huge_channel_run(bench=True, bench_rounds=15)
    assert result.report.int8["written"] == written
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node) == (written == "int8")
    assert sum("measured" in w and "float low-rank model is written" in w for w in result.report.warnings) == (
        written == "float")
    for stage in result.report.stages:
        assert stage["latency_ms"]["cpu"]["p50"] in (1.0, guarded_ms)


def test_when_no_int8_model_meets_the_tolerance_the_float_model_is_written_with_one_warning() -> None:
    model = conv_net([Layer(16), Layer(32), Layer(16)], size=(10, 10), classifier=5)
    data = np.random.default_rng(8).standard_normal((120, 3, 10, 10)).astype(np.float32)
    result = compress(model, 1.5, calibration=data, quantize="int8", int8_tolerance=1e-9, bench=False,
                      rank_multiple=4, threads=1)
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(node_ops(result.model).values())
    assert result.report.int8["written"] == "float" and result.report.int8["guard"]["failure"]
    stages = [s["stage"] for s in result.report.stages]
    assert "low-rank + int8" not in stages and "low-rank + int8, all nodes" in stages
    assert [s["stage"] for s in result.report.stages if s["written"]] == ["low-rank"]
    assert sum("float low-rank model is written" in w for w in result.report.warnings) == 1


@pytest.mark.parametrize("value", [0, -0.1, float("nan"), "0.05"])
def test_a_tolerance_that_is_not_a_positive_number_is_refused(value) -> None:
    from onnx_lowrank.errors import InvalidOptionError

    model = conv_net([Layer(16)], size=(8, 8), classifier=3)
    with pytest.raises(InvalidOptionError, match="int8_tolerance"):
        compress(model, 2.0, quantize="int8", int8_tolerance=value, bench=False, dry_run=True)
