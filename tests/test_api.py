"""The library API end to end on generated models, against the original model as reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lowrank import LowRankError, compress
from onnx_lowrank.errors import InvalidOptionError, NothingToDecomposeError
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.units import find_units
from onnx_lowrank.planning.costs import ConvShape, decomposed_macs
from onnx_lowrank.solvers.weights import spatial_filter_reconstruction, tucker2, weight_svd
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
    return (c0 + c1.macs + c2) / (c0 + decomposed_macs(c1, rank, "channel") + c2) * 0.99


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
    for key in ("speedup_target", "theoretical_speedup", "theoretical_model_speedup", "layers",
                "latency_ms", "actual_speedup", "fidelity"):
        assert key in report
    assert set(report["layers"][0]) >= {"name", "kernel", "in_channels", "out_channels", "rank",
                                        "flops_before", "flops_after", "energy", "skipped_reason"}
    assert report["latency_ms"]["cpu"]["original"] > 0 and report["latency_ms"]["cpu"]["optimized"] > 0
    assert report["actual_speedup"]["cpu"] == pytest.approx(
        report["latency_ms"]["cpu"]["original"] / report["latency_ms"]["cpu"]["optimized"])
    assert set(report["fidelity"]) >= {"output_rel_error", "top1_agreement", "top5_overlap"}
    assert report["theoretical_speedup"] >= 2.0


def test_unavailable_cuda_is_reported_not_measured(calib_file) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present")
    report = compress(planted_model(), 2.0, calibration=str(calib_file), providers=("cpu", "cuda"),
                      bench_rounds=15).report
    assert report.latency_ms["cuda"]["original"] is None
    assert "not available" in report.latency_ms["cuda"]["status"]
    assert report.actual_speedup["cuda"] is None
    cpu = report.latency_ms["cpu"]
    assert cpu["original"] <= cpu["p90"]["original"] and cpu["optimized"] <= cpu["p90"]["optimized"]
    assert cpu["throughput"]["optimized"] == pytest.approx(1e3 * cpu["batch"] / cpu["optimized"])


def test_a_provider_that_falls_back_to_cpu_is_never_reported_as_itself(calib_file, monkeypatch) -> None:
    """onnxruntime starts a CPU session when it cannot start the provider asked for; here it is
    told the provider is there (as when its package is installed but its device or libraries are not)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present")
    monkeypatch.setattr("onnx_lowrank.measure.fidelity.provider_available", lambda provider: True)
    report = compress(planted_model(), 2.0, calibration=str(calib_file), providers=("cpu", "cuda", "openvino"),
                      bench_rounds=15).report
    for provider in ("cuda", "openvino"):
        assert report.actual_speedup[provider] is None
        assert "fell back to CPUExecutionProvider" in report.latency_ms[provider]["status"]
    assert report.actual_speedup["cpu"] > 0


def test_two_onnxruntime_builds_installed_together_are_warned_about(calib_file, monkeypatch) -> None:
    """Each build installs the module ``onnxruntime`` over the other's files: providers then go
    missing or fail to start, so every run says which to remove."""
    from onnx_lowrank.runtime.sessions import mixed_builds_warning

    assert mixed_builds_warning({"onnxruntime-openvino": "1.24.1"}) is None
    monkeypatch.setattr("onnx_lowrank.pipeline.analysis.onnxruntime_builds",
                        lambda: {"onnxruntime": "1.32.0", "onnxruntime-openvino": "1.24.1"})
    report = compress(planted_model(), 2.0, calibration=str(calib_file), bench=False).report
    [warning] = [w for w in report.warnings if "installed together" in w]
    assert "onnxruntime 1.32.0 and onnxruntime-openvino 1.24.1" in warning
    assert "pip uninstall -y onnxruntime onnxruntime-openvino && pip install onnxruntime-openvino" in warning


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
    with pytest.raises(InvalidOptionError, match="--skip names no layer"):
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


@pytest.mark.slow
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
        assert report.theoretical_speedup >= 2.0
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


def three_layer_model():
    return conv_net([Layer(16), Layer(32), Layer(32, stride=2, pads=[1, 0, 2, 1]), Layer(32, k=(3, 5), act="none")],
                    size=(12, 12), seed=5)


def reconstructed_weight(method: str, unit, layer) -> tuple[np.ndarray, np.ndarray]:
    """The weights and bias one conv would need to compute what the baseline's chain computes."""
    if method == "svd":
        factors = weight_svd(unit.weight, unit.bias, layer.rank)
        matrix = unit.weight.reshape(len(unit.weight), -1)
        return (factors.P @ (factors.Q.T @ matrix)).reshape(unit.weight.shape), unit.bias
    if method == "jaderberg":
        vertical, horizontal = spatial_filter_reconstruction(unit.weight, layer.spatial_rank)
        return np.einsum("ojx,jiy->oiyx", horizontal[:, :, 0, :], vertical[:, :, :, 0]), unit.bias
    first, core, last = tucker2(unit.weight, layer.input_rank, layer.rank)
    return np.einsum("rsyx,or,si->oiyx", core, last[:, :, 0, 0], first[:, :, 0, 0]), unit.bias


@pytest.mark.parametrize("method", ["svd", "jaderberg", "tucker2"])
def test_data_free_baselines_compute_a_conv_with_the_reconstructed_weights(calib_file, method) -> None:
    model = three_layer_model()
    result = compress(model, 2.0, calibration=str(calib_file), bench=False, method=method, rank_multiple=4)
    assert result.report.theoretical_speedup >= 2.0 and result.report.rank_selection == "uniform"
    assert result.report.timings_s.get("collect") is None  # data-free: no responses collected
    reference = normalise(model)
    layers = {layer.name: layer for layer in result.report.layers}
    weights = {init.name: init for init in reference.graph.initializer}
    changed = 0
    for unit, node in zip(find_units(reference), [n for n in reference.graph.node if n.op_type == "Conv"]):
        layer = layers[unit.name]
        if layer.rank is None and layer.spatial_rank is None:
            continue
        weight, bias = reconstructed_weight(method, unit, layer)
        weights[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(weight.astype(np.float32), node.input[1]))
        weights[node.input[2]].CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), node.input[2]))
        changed += 1
    assert changed >= 2
    x = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert relative_error(run_model(reference, {"input": x})[0], run_model(result.model, {"input": x})[0]) < 1e-4


def counted_conv_macs(model: onnx.ModelProto, size=(12, 12)) -> dict[str, int]:
    """MACs of every Conv node from the tensor shapes onnx infers (independent of the cost model)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, *size)):
        dim.Clear()
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return {n.name: int(np.prod(shapes[n.output[0]])) * int(np.prod(weights[n.input[1]][1:]))
            for n in inferred.graph.node if n.op_type == "Conv"}


@pytest.mark.parametrize("method", ["asym3d", "jaderberg", "svd", "tucker2", "asymmetric"])
def test_reported_flops_are_the_flops_of_the_written_chains(calib_file, method) -> None:
    model = three_layer_model()
    result = compress(model, 2.5, calibration=str(calib_file), bench=False, method=method, rank_multiple=4)
    counted = counted_conv_macs(result.model)
    for layer in result.report.layers:
        chain = [macs for name, macs in counted.items() if name == layer.name or name.startswith(layer.name + "_lowrank")]
        assert 2 * sum(chain) == layer.flops_after, layer.name
    total_before = sum(layer.flops_before for layer in result.report.layers)
    assert total_before / (2 * sum(counted.values())) == pytest.approx(result.report.theoretical_speedup)


def test_asym3d_splits_each_kxk_layer_into_the_planned_three_convs(calib_file) -> None:
    model = three_layer_model()
    result = compress(model, 3.0, calibration=str(calib_file), bench=False, method="asym3d", rank_multiple=4)
    report = result.report
    assert report.channel_speedup == pytest.approx(np.sqrt(3.0)) and report.theoretical_speedup >= 3.0
    split = [layer for layer in report.layers if layer.spatial_rank is not None]
    assert split
    nodes = {n.name: n for n in result.model.graph.node}
    weights = {init.name: tuple(init.dims) for init in result.model.graph.initializer}
    for layer in split:
        kh, kw = layer.kernel
        chain = [weights[nodes[f"{layer.name}_lowrank{i}"].input[1]] for i in range(3)]
        assert chain == [(layer.spatial_rank, layer.in_channels, kh, 1), (layer.rank, layer.spatial_rank, 1, kw),
                         (layer.out_channels, layer.rank, 1, 1)]
        assert layer.response_error is not None and layer.solver_iterations is not None


def test_asym3d_is_closer_to_the_original_than_filter_reconstruction(calib_file) -> None:
    model = conv_net([Layer(32), Layer(64), Layer(64), Layer(64)], size=(12, 12), seed=3)
    errors = {}
    for method in ("asym3d", "jaderberg"):
        report = compress(model, 3.0, calibration=str(calib_file), bench=False, method=method, rank_multiple=8).report
        assert report.theoretical_speedup >= 3.0
        errors[method] = report.fidelity.output_rel_error[model.graph.output[0].name]
    assert errors["asym3d"] < 0.7 * errors["jaderberg"]


def test_channel_only_layers_are_not_split(calib_file) -> None:
    model = three_layer_model()
    name = find_units(normalise(model))[2].name
    report = compress(model, 2.5, calibration=str(calib_file), bench=False, method="asym3d", rank_multiple=4,
                      channel_only=(name,)).report
    layer = next(layer for layer in report.layers if layer.name == name)
    assert layer.spatial_rank is None and layer.rank is not None and "channel-only" in layer.note
    assert report.theoretical_speedup >= 2.5
    with pytest.raises(InvalidOptionError, match="names no layer"):
        compress(model, 2.5, calibration=str(calib_file), method="asym3d", channel_only=("nope",))


def test_ranks_off_the_nchwc_grid_warn(calib_file) -> None:
    model = planted_model()
    off = compress(model, 2.0, calibration=str(calib_file), bench=False, method="linear", rank_multiple=4).report
    on = compress(model, 1.5, calibration=str(calib_file), bench=False, method="linear", rank_multiple=16).report
    assert any("NCHWc" in w for w in off.warnings) and not any("NCHWc" in w for w in on.warnings)
