"""INT8 on top (--quantize int8): onnxruntime's quantizer, the stages, and input models that are
already quantized or half precision. The accuracy guard has its own tests (test_int8_guard.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lowrank import compress
from onnx_lowrank.errors import InvalidOptionError, ModelLoadError
from onnx_lowrank.quantize import Int8Quantizer, SourceReader
from onnx_lowrank.runtime.calibration import model_inputs, open_calibration
from tests.builders import Layer, conv_net, relative_error, run_model

LAYERS = [Layer(16), Layer(32, weight_rank=8), Layer(32, weight_rank=8), Layer(16)]


def model_and_data(samples: int = 64):
    model = conv_net(LAYERS, size=(10, 10), classifier=5)
    data = np.random.default_rng(1).standard_normal((samples, 3, 10, 10)).astype(np.float32)
    return model, data


def reader_for(model, data):
    return SourceReader(open_calibration(data, model_inputs(model)), list(range(len(data))), 16)


def quantize_all(model, data, symmetric_activations: bool = False) -> onnx.ModelProto:
    with Int8Quantizer(model, reader_for(model, data), symmetric_activations=symmetric_activations) as quantizer:
        return quantizer.quantize()


def test_compress_with_int8_reports_every_stage_against_an_independent_measurement() -> None:
    model, data = model_and_data(96)
    evaluation = np.random.default_rng(2).standard_normal((40, 3, 10, 10)).astype(np.float32)
    result = compress(model, 2.0, calibration=data, evaluation=evaluation, quantize="int8", bench=True,
                      bench_rounds=15, threads=1, rank_multiple=4)
    stages = {s["stage"]: s for s in result.report.stages}
    assert list(stages) == ["original", "low-rank", "low-rank + int8", "int8"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in result.model.graph.node}
    reference = run_model(model, {"input": evaluation})[0]
    written = relative_error(reference, run_model(result.model, {"input": evaluation})[0])
    measured = next(iter(stages["low-rank + int8"]["fidelity"]["output_rel_error"].values()))
    # the tool's sessions fuse QDQ into integer kernels, run_model runs them unfused, in float
    assert measured == pytest.approx(written, rel=0.02)
    assert stages["original"]["fidelity"]["output_rel_error"] == {next(iter(
        stages["low-rank"]["fidelity"]["output_rel_error"])): 0.0}
    for stage in stages.values():
        latency = stage["latency_ms"]["cpu"]
        assert 0 < latency["p50"] <= latency["p90"]
    assert result.report.int8["calibration"] == "minmax"
    assert '"stages"' in result.report.to_json()


def test_a_quantized_or_half_precision_model_is_refused() -> None:
    model, data = model_and_data()
    qdq = quantize_all(model, data)
    with pytest.raises(ModelLoadError, match="already quantized"):
        compress(qdq, 2.0, calibration=data, bench=False)
    half = onnx.ModelProto()
    half.CopyFrom(model)
    weight = half.graph.initializer[0]
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight).astype(np.float16), weight.name))
    with pytest.raises(ModelLoadError, match="16-bit float"):
        compress(half, 2.0, calibration=data, bench=False)


def test_with_a_budget_the_int8_model_is_the_answer_and_meets_it() -> None:
    """The budget holds for the model written, INT8 included: its held-out error, computed here."""
    from onnx_lowrank.pipeline.budget import Budget
    from onnx_lowrank.pipeline.search import compress_to_budget

    model, data = model_and_data(100)
    result = compress_to_budget(model, Budget("error", 0.1), calibration=data, quantize="int8", bench=False,
                                rank_multiple=8, threads=1)
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    held_out = {"input": data[80:]}
    reference, approx = run_model(model, held_out)[0], run_model(result.model, held_out)[0]
    error = float(np.linalg.norm(reference - approx) / np.linalg.norm(reference))
    assert error <= 0.1 and result.report.budget["measured"] == pytest.approx(error, rel=1e-3)
    int8_points = [p for p in result.report.frontier if p.solver.endswith(" + int8")]
    assert int8_points and int8_points[-1].met and [s["stage"] for s in result.report.stages][-1] == "int8"


@pytest.mark.slow
def test_when_int8_breaks_the_budget_slower_plans_are_tried_then_it_says_so(caplog) -> None:
    from onnx_lowrank.errors import BudgetNotMetError
    from onnx_lowrank.pipeline.budget import Budget
    from onnx_lowrank.pipeline.budget_int8 import INT8_STEPS
    from onnx_lowrank.pipeline.search import compress_to_budget

    model, data = model_and_data(100)
    # float plans meet 2e-3 (this model is exactly low rank up to ~2x); INT8's own rounding error does not
    with caplog.at_level("INFO", logger="onnx_lowrank.pipeline"), pytest.raises(BudgetNotMetError,
                                                                               match="with INT8 on top"):
        compress_to_budget(model, Budget("error", 2e-3), calibration=data, quantize="int8", bench=False,
                           rank_multiple=8, threads=1, speedup=1.2)
    tried = [r.getMessage() for r in caplog.records if "+ int8 at" in r.getMessage()]
    assert len(tried) == INT8_STEPS + 1 and all("(missed)" in line for line in tried)


def test_an_unknown_int8_calibration_is_refused() -> None:
    model, data = model_and_data()
    with pytest.raises(InvalidOptionError, match="int8 calibration .kl."):
        compress(model, 2.0, calibration=data, quantize="int8", int8_calibration="kl")


def test_symmetric_activations_for_tensorrt_have_int8_zero_points_of_zero() -> None:
    model, data = model_and_data()
    quantized = quantize_all(model, data, symmetric_activations=True)
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    reference = run_model(model, {"input": data})[0]
    assert relative_error(reference, run_model(quantized, {"input": data})[0]) < 0.05


def test_a_failure_inside_onnxruntimes_quantizer_is_one_error(monkeypatch) -> None:
    from onnx_lowrank.errors import QuantizationError

    def broken(*args, **kwargs):
        raise RuntimeError("symbolic shape inference failed\nat node 7")

    monkeypatch.setattr("onnx_lowrank.quantize.quantizer.quant_pre_process", broken)
    model, data = model_and_data()
    with pytest.raises(QuantizationError, match=r"quantizer failed on the model: symbolic shape inference failed \(hint"):
        quantize_all(model, data)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_takes_a_count_that_is_not_a_multiple_of_the_batch(method: str) -> None:
    model, data = model_and_data(21)
    reader = SourceReader(open_calibration(data, model_inputs(model)), list(range(21)), 8)
    assert len({len(next(iter(batch.values()))) for batch in iter(reader.get_next, None)}) == 1
    with Int8Quantizer(model, reader, method) as quantizer:
        quantized = quantizer.quantize()
    reference = run_model(model, {"input": data})[0]
    assert relative_error(reference, run_model(quantized, {"input": data})[0]) < 0.1


def test_where_symbolic_shape_inference_fails_int8_goes_on_and_leaves_nothing_in_the_working_folder(
        monkeypatch, tmp_path) -> None:
    """onnxruntime saves its partial model to ./sym_shape_infer_temp.onnx and raises (PP-OCR's
    recogniser): the quantizer goes on without the symbolic pass, and the user's folder stays clean."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def incomplete(model, *args, **kwargs):
        onnx.save_model(model, "sym_shape_infer_temp.onnx", save_as_external_data=True)
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(incomplete))
    monkeypatch.chdir(tmp_path)
    model, data = model_and_data()
    quantized = quantize_all(model, data)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.graph.node}
    assert list(tmp_path.iterdir()) == []


def test_a_model_of_an_opset_before_13_gets_per_channel_weights_onnxruntime_loads() -> None:
    """DequantizeLinear's axis came with opset 13: an opset-12 model (PP-OCR's recogniser) is upgraded first."""
    model = conv_net(LAYERS, size=(10, 10), classifier=5, opset=12)
    data = np.random.default_rng(1).standard_normal((32, 3, 10, 10)).astype(np.float32)
    quantized = quantize_all(model, data)
    onnx.checker.check_model(quantized)
    assert any(a.name == "axis" for n in quantized.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    reference = run_model(model, {"input": data})[0]
    assert relative_error(reference, run_model(quantized, {"input": data})[0]) < 0.05
