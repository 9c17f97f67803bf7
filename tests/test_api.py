"""The library API end to end on generated models, against the original model as reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lowrank import LowRankError, compress
from onnx_lowrank.costs import ConvShape, channel_decomposed_macs
from onnx_lowrank.errors import InvalidOptionError, NothingToDecomposeError
from tests.builders import Layer, conv_net, relative_error, run_model


def planted_model():
    """conv0 (left alone) then a conv whose 64x576 weight matrix has rank 16: its responses are rank 16."""
    layers = [Layer(64), Layer(64, weight_rank=16, bn=True), Layer(8, k=1, act="none")]
    return conv_net(layers, size=(12, 12), classifier=10)


def speedup_for_rank(rank: int) -> float:
    """A target a little below what rank ``rank`` on the planted layer gives, so uniform picks it."""
    c0 = ConvShape(3, 64, (3, 3), (12, 12)).macs
    c1 = ConvShape(64, 64, (3, 3), (12, 12))
    c2 = ConvShape(64, 8, (1, 1), (12, 12)).macs
    return (c0 + c1.macs + c2) / (c0 + channel_decomposed_macs(c1, rank) + c2) * 0.99


@pytest.fixture
def calib_file(tmp_path):
    data = np.random.default_rng(0).standard_normal((60, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=data, labels=np.zeros(60, np.int64))
    return tmp_path / "calib.npz"


def test_planted_low_rank_layer_is_reproduced_exactly(calib_file) -> None:
    model = planted_model()
    result = compress(model, speedup_for_rank(16), calibration=str(calib_file), bench=False)
    planted = result.report.layers[1]
    assert planted.rank == 16
    assert planted.energy == pytest.approx(1.0, abs=1e-6)
    assert planted.response_error < 1e-4
    assert result.report.fidelity.output_rel_error[model.graph.output[0].name] < 1e-4
    assert result.report.fidelity.top1_agreement == 1.0
    x = np.random.default_rng(9).standard_normal((4, 3, 12, 12)).astype(np.float32)
    assert relative_error(run_model(model, {"input": x})[0], run_model(result.model, {"input": x})[0]) < 1e-4
    assert result.report.layers[0].skipped_reason.startswith("first conv layer")
    assert "cannot pay off" in result.report.layers[2].skipped_reason


def test_lower_rank_than_planted_loses_accuracy(calib_file) -> None:
    result = compress(planted_model(), speedup_for_rank(8), calibration=str(calib_file), bench=False,
                      rank_multiple=8)
    assert result.report.layers[1].rank == 8
    assert result.report.layers[1].response_error > 1e-2
    assert result.report.layers[1].energy < 0.99


def test_report_has_stable_keys_and_measured_latency(calib_file) -> None:
    report = compress(planted_model(), 2.0, calibration=str(calib_file), bench_rounds=15).report.to_dict()
    for key in ("speedup_target", "theoretical_conv_speedup", "theoretical_model_speedup", "layers",
                "latency_ms", "actual_speedup", "fidelity"):
        assert key in report
    assert set(report["layers"][0]) >= {"name", "kernel", "in_channels", "out_channels", "rank",
                                        "flops_before", "flops_after", "energy", "skipped_reason"}
    assert report["latency_ms"]["cpu"]["original"] > 0 and report["latency_ms"]["cpu"]["optimized"] > 0
    assert report["actual_speedup"]["cpu"] == pytest.approx(
        report["latency_ms"]["cpu"]["original"] / report["latency_ms"]["cpu"]["optimized"])
    assert set(report["fidelity"]) >= {"output_rel_error", "top1_agreement", "top5_overlap"}
    assert report["theoretical_conv_speedup"] >= 2.0


def test_unavailable_cuda_is_reported_not_measured(calib_file) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present")
    report = compress(planted_model(), 2.0, calibration=str(calib_file), providers=("cpu", "cuda"),
                      bench_rounds=15).report
    assert report.latency_ms["cuda"]["original"] is None
    assert "not available" in report.latency_ms["cuda"]["status"]
    assert report.actual_speedup["cuda"] is None


def test_dry_run_plans_without_solving(calib_file) -> None:
    result = compress(planted_model(), 2.0, calibration=str(calib_file), dry_run=True)
    assert result.model is None
    layer = result.report.layers[1]  # energy selection needs the responses, but nothing is solved
    assert layer.rank is not None and layer.energy is not None and layer.response_error is None
    uniform = compress(planted_model(), 2.0, calibration=str(calib_file), dry_run=True, rank_selection="uniform")
    assert uniform.report.layers[1].rank is not None and uniform.report.layers[1].energy is None


def test_skip_leaves_a_layer_alone(calib_file) -> None:
    model = conv_net([Layer(32), Layer(64), Layer(64)], size=(12, 12))
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    result = compress(model, 1.5, calibration=str(calib_file), skip=(names[1],), bench=False)
    assert result.report.layers[1].skipped_reason == "skipped by --skip"
    assert result.report.layers[2].rank is not None
    with pytest.raises(InvalidOptionError, match="--skip names no conv"):
        compress(model, 1.5, calibration=str(calib_file), skip=("nope",))


def test_random_calibration_warns(calib_file) -> None:
    result = compress(planted_model(), 2.0, bench=False, num_images=16)
    assert any("random inputs" in w for w in result.report.warnings)


def test_fixed_batch_model_and_labelled_evaluation(tmp_path) -> None:
    model = conv_net([Layer(16), Layer(64), Layer(64)], size=(10, 10), dynamic_batch=False, classifier=6)
    data = np.random.default_rng(0).standard_normal((30, 3, 10, 10)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    np.savez(tmp_path / "eval.npz", input=data[:12], labels=np.arange(12) % 6)
    report = compress(model, 2.0, calibration=str(tmp_path / "calib.npy"), evaluation=str(tmp_path / "eval.npz"),
                      bench=False).report
    assert report.fidelity.samples == 12
    assert report.fidelity.accuracy_original is not None and report.fidelity.accuracy_optimized is not None


def test_model_without_decomposable_conv() -> None:
    depthwise = conv_net([Layer(3, group=3)], size=(8, 8))
    with pytest.raises(NothingToDecomposeError, match="depthwise conv"):
        compress(depthwise, 2.0)


def test_errors_share_one_base() -> None:
    with pytest.raises(LowRankError):
        compress(onnx.ModelProto(), 2.0)


def test_fixed_batch_of_four_is_fed_whole_batches(tmp_path) -> None:
    model = conv_net([Layer(16), Layer(64), Layer(64)], size=(10, 10), dynamic_batch=False, classifier=6)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((30, 3, 10, 10)).astype(np.float32))
    report = compress(model, 2.0, calibration=str(tmp_path / "calib.npy"), bench_rounds=15).report
    assert report.calibration_samples % 4 == 0 and report.fidelity.samples % 4 == 0
    assert report.latency_ms["cpu"]["optimized"] > 0


@pytest.mark.parametrize("method", ["nonlinear", "asymmetric"])
def test_nonlinear_methods_reproduce_the_planted_layer(calib_file, method) -> None:
    model = planted_model()
    result = compress(model, speedup_for_rank(16), calibration=str(calib_file), bench=False, method=method)
    assert result.report.method == method
    assert result.report.layers[1].rank == 16
    assert result.report.fidelity.output_rel_error[model.graph.output[0].name] < 1e-3


@pytest.mark.parametrize("selection", ["uniform", "energy"])
def test_asymmetric_corrects_the_error_of_earlier_layers(calib_file, selection) -> None:
    model = conv_net([Layer(32), Layer(64), Layer(64), Layer(64)], size=(12, 12), seed=3)
    errors, passes = {}, {}
    for method, symmetric in (("nonlinear", False), ("asymmetric", True), ("asymmetric", False)):
        report = compress(model, 2.5, calibration=str(calib_file), bench=False, method=method, symmetric=symmetric,
                          rank_multiple=8, rank_selection=selection).report
        errors[method, symmetric] = report.fidelity.output_rel_error[model.graph.output[0].name]
        passes[method, symmetric] = report.asymmetric_collection_passes
    assert errors["asymmetric", False] < errors["asymmetric", True] == pytest.approx(errors["nonlinear", False])
    assert passes["asymmetric", True] is None
    # Layers 2 and 3 are re-collected through their prefixes only: less than two full passes.
    assert 0.5 < passes["asymmetric", False] < 2.0


def test_energy_selection_beats_uniform_on_the_response_energy(calib_file) -> None:
    model = conv_net([Layer(32), Layer(64, weight_rank=12), Layer(64), Layer(64, weight_rank=40)], size=(12, 12))
    kept = {}
    for selection in ("uniform", "energy"):
        report = compress(model, 2.0, calibration=str(calib_file), bench=False, method="linear",
                          rank_multiple=4, rank_selection=selection).report
        assert report.theoretical_conv_speedup >= 2.0
        kept[selection] = sum(np.log(layer.energy) for layer in report.layers if layer.rank is not None)
    assert kept["energy"] > kept["uniform"]


def test_symmetric_needs_the_asymmetric_method(calib_file) -> None:
    with pytest.raises(InvalidOptionError, match="changes the asymmetric methods"):
        compress(planted_model(), 2.0, calibration=str(calib_file), method="linear", symmetric=True)


def test_few_samples_per_channel_warn_for_the_regression_methods(calib_file) -> None:
    model = planted_model()
    few = compress(model, 2.0, calibration=str(calib_file), bench=False, samples_per_image=4).report
    assert any("samples per channel" in w for w in few.warnings)
    linear = compress(model, 2.0, calibration=str(calib_file), bench=False, samples_per_image=4, method="linear")
    assert not any("samples per channel" in w for w in linear.report.warnings)
