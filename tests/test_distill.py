"""--distill: the low-rank model trained toward the original on ONNX itself (paper §3.6)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_lowrank import compress
from onnx_lowrank.errors import InvalidOptionError
from tests.builders import Layer, conv_net, run_model

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:  # imported by the code under test, which copes with torchvision
    pytest.skip("the [distill] extra is not installed", allow_module_level=True)

from onnx_lowrank.distill.convert import TorchStudent, with_weights  # noqa: E402  (after the skip)


def data(count: int = 120, size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def test_trained_weights_written_back_reproduce_the_torch_module_in_onnxruntime() -> None:
    """Conv weights (parameters), a Gemm's (a transposed nn.Linear weight) and a MatMul's constant
    (a buffer) are each found, trained and written back by name."""
    model = conv_net([Layer(8), Layer(16)], size=(8, 8), classifier=5, dense=((12, "relu"),))
    names = [i.name for i in model.graph.initializer if len(i.dims) >= 1]
    student = TorchStudent(model, names)
    assert {t.name for t in student.trainable} == set(names)
    assert any(t.transposed for t in student.trainable)  # the Gemm's weight, as nn.Linear holds it
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(1.5).add_(0.01)
    x = data(4, 8)
    expected = student([torch.from_numpy(x)])
    written = with_weights(model, student.state())
    got = run_model(written, {"input": x})[0]
    name = model.graph.output[0].name
    assert np.allclose(got, expected[name].detach().numpy(), atol=1e-4)
    assert not np.allclose(got, run_model(model, {"input": x})[0], atol=1e-2)  # the weights did change


def test_distillation_wins_back_accuracy_a_data_free_plan_loses() -> None:
    """The svd baseline ignores the data; training toward the original on the calibration samples
    must bring the held-out error down, and the model written must be the one measured."""
    model = conv_net([Layer(16), Layer(48), Layer(48), Layer(48)], size=(12, 12), classifier=10)
    result = compress(model, 3.0, calibration=data(), method="svd", distill=True, distill_time=120, distill_steps=800, bench=False,
                      threads=1, num_images=100, holdout=20, rank_multiple=4)
    distill = result.report.distill
    before, after = distill["held_out_error"]["before"], distill["held_out_error"]["after"]
    assert distill["applied"] and after < 0.5 * before, distill
    assert distill["onnxruntime_vs_torch"] <= 1e-4 and distill["steps"] > 0
    assert max(result.report.fidelity.output_rel_error.values()) == pytest.approx(after, rel=1e-5)
    losses = [e["validation_loss"] for e in distill["history"]]
    assert min(losses) < losses[0]


def test_a_model_that_does_not_convert_keeps_the_undistilled_model_with_one_warning() -> None:
    model = conv_net([Layer(16), Layer(48), Layer(48)], size=(12, 12))
    first = model.graph.node[0]
    shrunk = helper.make_node("Shrink", [first.input[0]], ["shrunk"], lambd=0.1)  # onnx2torch has no Shrink
    first.input[0] = "shrunk"
    model.graph.node.insert(0, shrunk)  # before every layer: no part of the model converts
    plain = compress(model, 2.0, calibration=data(), bench=False, threads=1)
    result = compress(model, 2.0, calibration=data(), distill=True, distill_time=20, bench=False, threads=1)
    assert not result.report.distill["applied"] and "convert" in result.report.distill["reason"]
    assert any("distillation did not apply" in w for w in result.report.warnings)
    assert result.model.SerializeToString() == plain.model.SerializeToString()


def test_without_the_extra_distill_is_one_error_with_the_install_hint(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2torch" else real(name, *a))
    with pytest.raises(InvalidOptionError, match=r"--distill needs onnx2torch.*onnx-lowrank\[distill\]"):
        compress(conv_net([Layer(8)]), 2.0, distill=True)


def test_distill_options_are_checked() -> None:
    with pytest.raises(InvalidOptionError, match="distill_time"):
        compress(conv_net([Layer(8)]), 2.0, distill=True, distill_time=0)
    with pytest.raises(InvalidOptionError, match="distill device"):
        compress(conv_net([Layer(8)]), 2.0, distill=True, distill_device="tpu")


def test_an_op_after_the_last_decomposed_layer_that_does_not_convert_leaves_the_part_before_it_distilled() -> None:
    model = conv_net([Layer(16), Layer(48), Layer(48), Layer(48)], size=(12, 12))
    out = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Shrink", [out], ["shrunk"], lambd=0.01))
    model.graph.output[0].name = "shrunk"
    result = compress(model, 3.0, calibration=data(), method="svd", distill=True, distill_time=120, distill_steps=800, bench=False,
                      threads=1, num_images=100, holdout=20, rank_multiple=4)
    distill = result.report.distill
    assert distill["scope"].startswith("the part up to the last decomposed layer"), distill["scope"]
    assert distill["applied"] and distill["held_out_error"]["after"] < 0.7 * distill["held_out_error"]["before"]


def test_the_cli_distils_reports_and_plots_the_loss(tmp_path) -> None:
    from tests.test_cli import invoke

    onnx.save(conv_net([Layer(16), Layer(48), Layer(48)], size=(12, 12), classifier=5), tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", input=data(80))
    result = invoke(tmp_path / "in.onnx", tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz", "--speedup", "2",
                    "--distill", "--distill-time", "5", "--distill-steps", "40", "--no-bench", "--threads", "1",
                    "--report", tmp_path / "r.json", "--plot", tmp_path / "loss.png")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["distill"] is True and report["distill"]["steps"] <= 40
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "held-out error" in result.stdout


@pytest.mark.slow
def test_a_budget_search_distils_the_plan_it_found_and_marks_it_in_the_frontier() -> None:
    from onnx_lowrank import Budget, compress_to_budget

    model = conv_net([Layer(16), Layer(48), Layer(48), Layer(48)], size=(12, 12), classifier=10)
    result = compress_to_budget(model, Budget("error", 0.6), calibration=data(), method="svd", distill=True,
                                distill_time=120, distill_steps=400, bench=False, threads=1, rank_multiple=4,
                                num_images=100, holdout=20)
    report = result.report
    assert report.distill["applied"], report.distill
    distilled = [p for p in report.frontier if p.solver == "svd (distilled)"]
    assert len(distilled) == 1 and report.budget["measured"] == distilled[0].value and report.budget["met"]
    assert distilled[0].value == pytest.approx(max(report.fidelity.output_rel_error.values()), rel=1e-5)


def test_an_op_torch_cannot_run_after_the_layers_leaves_the_part_before_it_distilled() -> None:
    """onnx2torch converts a reflect Pad over channels, but torch cannot run it (Silero's encoder
    pads so): the part up to the last decomposed layer is distilled, never a failed run."""
    model = conv_net([Layer(16), Layer(48), Layer(48), Layer(48)], size=(12, 12))
    out = model.graph.output[0].name
    model.graph.initializer.append(helper.make_tensor("pads", onnx.TensorProto.INT64, [8], [0, 1, 0, 0, 0, 1, 0, 0]))
    model.graph.node.append(helper.make_node("Pad", [out, "pads"], ["padded"], mode="reflect"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("padded", onnx.TensorProto.FLOAT, [None] * 4))
    result = compress(model, 3.0, calibration=data(), method="svd", distill=True, distill_time=120, distill_steps=800,
                      bench=False, threads=1, num_images=100, holdout=20, rank_multiple=4)
    distill = result.report.distill
    assert "does not run in torch" in distill["scope"], distill["scope"]
    assert distill["applied"] and distill["held_out_error"]["after"] < 0.7 * distill["held_out_error"]["before"]
