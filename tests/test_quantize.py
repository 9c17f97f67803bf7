"""INT8 on top (--quantize int8): onnxruntime's quantizer, the four stages, fragile activations
kept in float, and input models that are already quantized or half precision."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from onnx_lowrank import compress
from onnx_lowrank.calibration import model_inputs, open_calibration
from onnx_lowrank.errors import InvalidOptionError, ModelLoadError
from onnx_lowrank.quantize import FRAGILE_SQNR_DB, SourceReader, quantize_int8, rounding_sqnr
from tests.builders import Layer, conv_net, relative_error, run_model

LAYERS = [Layer(16), Layer(32, weight_rank=8), Layer(32, weight_rank=8), Layer(16)]


def model_and_data(samples: int = 64):
    model = conv_net(LAYERS, size=(10, 10), classifier=5)
    data = np.random.default_rng(1).standard_normal((samples, 3, 10, 10)).astype(np.float32)
    return model, data


def test_rounding_sqnr_is_the_int8_grid_noise_and_ignores_a_folded_relu() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, 100_000)
    step = 1 / 255
    after = np.round(values / step) * step
    # uniform values on [0, 1]: signal power 1/3, rounding noise step^2 / 12
    assert rounding_sqnr(values, after) == pytest.approx(10 * np.log10((1 / 3) / (step ** 2 / 12)), abs=0.3)
    # a ReLU folded into the pair: negatives before it become 0 after it and are not noise
    signed = np.concatenate([values, -values])
    assert rounding_sqnr(signed, np.concatenate([after, np.zeros_like(after)])) == pytest.approx(
        rounding_sqnr(values, after), abs=0.01)
    assert rounding_sqnr(values, values) == float("inf")


def reader_for(model, data):
    return SourceReader(open_calibration(data, model_inputs(model)), list(range(len(data))), 16)


def test_an_outlier_activation_is_kept_in_float_and_that_helps() -> None:
    model, data = model_and_data()
    test = data[:32].copy()
    data[0, :, 4, 4] = 300  # one calibration pixel stretches the convs' minmax ranges ~50-fold
    quantized = quantize_int8(model, reader_for(model, data))
    assert quantized.kept_float and all(sqnr < FRAGILE_SQNR_DB for sqnr in quantized.kept_float.values())
    assert set(quantized.kept_float) <= {n.name for n in quantized.model.graph.node}

    # onnxruntime's quantizer alone, the same settings, nothing kept in float
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(model, Path(folder) / "f.onnx")
        quantize_static(str(Path(folder) / "f.onnx"), str(Path(folder) / "q.onnx"), reader_for(model, data),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        plain = onnx.load(Path(folder) / "q.onnx")
    reference = run_model(model, {"input": test})[0]
    kept_error = relative_error(reference, run_model(quantized.model, {"input": test})[0])
    plain_error = relative_error(reference, run_model(plain, {"input": test})[0])
    assert kept_error < 0.7 * plain_error
    assert "QuantizeLinear" in {n.op_type for n in quantized.model.graph.node}  # the rest is still int8


def test_well_behaved_activations_are_all_quantized() -> None:
    model, data = model_and_data()
    quantized = quantize_int8(model, reader_for(model, data))
    assert quantized.kept_float == {}
    ops = {n.op_type for n in quantized.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    reference = run_model(model, {"input": data})[0]
    assert relative_error(reference, run_model(quantized.model, {"input": data})[0]) < 0.05


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
    qdq = quantize_int8(model, reader_for(model, data)).model
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
    from onnx_lowrank.search import Budget, compress_to_budget

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


def test_when_int8_breaks_the_budget_slower_plans_are_tried_then_it_says_so(caplog) -> None:
    from onnx_lowrank.errors import BudgetNotMetError
    from onnx_lowrank.search import INT8_STEPS, Budget, compress_to_budget

    model, data = model_and_data(100)
    # float plans meet 2e-3 (this model is exactly low rank up to ~2x); INT8's own rounding error does not
    with caplog.at_level("INFO", logger="onnx_lowrank.search"), pytest.raises(BudgetNotMetError,
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
    quantized = quantize_int8(model, reader_for(model, data), symmetric_activations=True).model
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    reference = run_model(model, {"input": data})[0]
    assert relative_error(reference, run_model(quantized, {"input": data})[0]) < 0.05


def test_a_failure_inside_onnxruntimes_quantizer_is_one_error(monkeypatch) -> None:
    from onnx_lowrank.errors import QuantizationError

    def broken(*args, **kwargs):
        raise RuntimeError("symbolic shape inference failed\nat node 7")

    monkeypatch.setattr("onnx_lowrank.quantize.quant_pre_process", broken)
    model, data = model_and_data()
    with pytest.raises(QuantizationError, match=r"quantizer failed on the model: symbolic shape inference failed \(hint"):
        quantize_int8(model, reader_for(model, data))


def test_the_noise_measurement_keeps_its_activations_within_a_memory_bound(monkeypatch, caplog) -> None:
    """Every activation of every measured sample is held at once: on a large model only as many
    samples as fit the bound are run (here one)."""
    import logging

    monkeypatch.setattr("onnx_lowrank.quantize.DEBUG_MEMORY", 1)
    model, data = model_and_data()
    with caplog.at_level(logging.DEBUG, logger="onnx_lowrank.quantize"):
        quantized = quantize_int8(model, reader_for(model, data))
    assert "noise measured on 1 samples" in caplog.text
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.model.graph.node}
