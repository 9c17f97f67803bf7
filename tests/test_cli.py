"""The command line: a happy path, and bad input that must exit non-zero, say one line and write nothing."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from onnx_lowrank.cli.app import main
from tests.builders import Layer, conv_net


@pytest.fixture
def tiny(tmp_path):
    model = conv_net([Layer(16), Layer(64), Layer(64)], size=(10, 10), classifier=5)
    onnx.save(model, tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((40, 3, 10, 10)).astype(np.float32))
    return tmp_path


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stderr + self.stdout


def invoke(*args) -> Outcome:
    """The installed entry point (``main``), run in this process with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
    return Outcome(code, out.getvalue(), err.getvalue())


def test_compresses_and_writes_model_and_report(tiny) -> None:
    out, report = tiny / "out" / "fast.onnx", tiny / "report.json"
    result = invoke(tiny / "tiny.onnx", out, "--speedup", "2", "--calib", tiny / "calib.npz",
                    "--report", report, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "measured speedup cpu" in result.output and "theoretical speedup" in result.output
    onnx.checker.check_model(onnx.load(str(out)))
    data = json.loads(report.read_text())
    assert data["speedup_target"] == 2.0 and data["theoretical_speedup"] >= 2.0
    assert data["layers"][0]["rank"] is None and any(layer["rank"] for layer in data["layers"])
    assert (data["method"], data["rank_selection"], data["symmetric"]) == ("asymmetric", "energy", False)
    assert not list(out.parent.glob("*.tmp"))


def test_ablation_flags_reach_the_report(tiny) -> None:
    report = tiny / "report.json"
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "2", "--calib", tiny / "calib.npz",
                    "--report", report, "--no-bench", "--uniform", "--symmetric")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["rank_selection"], data["symmetric"], data["asymmetric_collection_passes"]) == ("uniform", True, None)
    assert [layer["rank"] is not None for layer in data["layers"]] == [False, True, True, False]


@pytest.mark.parametrize("method, selection", [("asym3d", "energy"), ("jaderberg", "uniform"), ("svd", "uniform"),
                                               ("tucker2", "uniform")])
def test_every_method_writes_a_model_that_meets_the_target(tiny, method, selection) -> None:
    report = tiny / "report.json"
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "2", "--calib", tiny / "calib.npz",
                    "--report", report, "--no-bench", "--method", method, "--rank-multiple", "8")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["method"], data["rank_selection"]) == (method, selection)
    assert data["theoretical_speedup"] >= 2.0
    onnx.checker.check_model(onnx.load(str(tiny / "fast.onnx")))


def test_dry_run_writes_nothing(tiny) -> None:
    out = tiny / "fast.onnx"
    result = invoke(tiny / "tiny.onnx", out, "--speedup", "2", "--calib", tiny / "calib.npz", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "plan" in result.output and not out.exists()


def test_random_calibration_is_loud(tiny) -> None:
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "2", "--no-bench", "--num-images", "12")
    assert result.exit_code == 0
    assert "warning: " in result.output and "random inputs" in result.output


def bad_cases(tmp):
    (tmp / "text.onnx").write_text("this is not a model")
    (tmp / "truncated.onnx").write_bytes((tmp / "tiny.onnx").read_bytes()[:300])
    onnx.save(conv_net([Layer(3, group=3)], size=(10, 10)), tmp / "depthwise.onnx")
    np.save(tmp / "wrong.npy", np.zeros((5, 1, 10, 10), np.float32))
    (tmp / "empty").mkdir()
    good, calib = tmp / "tiny.onnx", ["--calib", tmp / "calib.npz"]
    return {
        "not-onnx": ([tmp / "text.onnx", tmp / "o.onnx", *calib], "not"),
        "truncated": ([tmp / "truncated.onnx", tmp / "o.onnx", *calib], "onnx"),
        "missing-model": ([tmp / "nope.onnx", tmp / "o.onnx", *calib], "not found"),
        "no-decomposable-conv": ([tmp / "depthwise.onnx", tmp / "o.onnx", *calib], "no decomposable layer"),
        "speedup-0.5": ([good, tmp / "o.onnx", "--speedup", "0.5", *calib], "greater than 1"),
        "speedup-1": ([good, tmp / "o.onnx", "--speedup", "1", *calib], "greater than 1"),
        "speedup-1000": ([good, tmp / "o.onnx", "--speedup", "1000", *calib], "cannot be reached"),
        "missing-calib": ([good, tmp / "o.onnx", "--calib", tmp / "nope.npz"], "not found"),
        "empty-calib": ([good, tmp / "o.onnx", "--calib", tmp / "empty"], "no images"),
        "wrong-shape": ([good, tmp / "o.onnx", "--calib", tmp / "wrong.npy"], "has shape"),
        "output-is-input": ([good, good, *calib], "refusing to write over"),
        "bad-provider": ([good, tmp / "o.onnx", "--providers", "tpu", *calib], "unknown provider"),
        "bad-method": ([good, tmp / "o.onnx", "--method", "cp", *calib], "is not one of"),
        "channel-only-not-3d": ([good, tmp / "o.onnx", "--channel-only", "x", *calib], "--method asym3d"),
        "channel-only-unknown": ([good, tmp / "o.onnx", "--method", "asym3d", "--channel-only", "nope", *calib],
                                 "names no layer"),
        "tucker2-energy": ([good, tmp / "o.onnx", "--method", "tucker2", "--rank-selection", "energy", *calib],
                           "uniform"),
        "uniform-vs-energy": ([good, tmp / "o.onnx", "--uniform", "--rank-selection", "energy", *calib],
                              "contradicts"),
    }


@pytest.mark.parametrize("case", ["not-onnx", "truncated", "missing-model", "no-decomposable-conv", "speedup-0.5",
                                  "speedup-1", "speedup-1000", "missing-calib", "empty-calib", "wrong-shape",
                                  "output-is-input", "bad-provider", "bad-method", "channel-only-not-3d",
                                  "channel-only-unknown", "tucker2-energy", "uniform-vs-energy"])
def test_bad_input_is_one_line_and_writes_nothing(tiny, case) -> None:
    before = (tiny / "tiny.onnx").read_bytes()
    args, message = bad_cases(tiny)[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tiny / "o.onnx").exists()
    assert (tiny / "tiny.onnx").read_bytes() == before


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["only-one-argument.onnx"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_module_entry_point_shows_help() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "onnx_lowrank", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--speedup" in out.stdout


def test_report_says_what_produced_it(tiny) -> None:
    from onnx_lowrank.output.provenance import sha256_of

    out, report = tiny / "fast.onnx", tiny / "report.json"
    assert invoke(tiny / "tiny.onnx", out, "--speedup", "2", "--calib", tiny / "calib.npz", "--report", report,
                  "--no-bench", "--seed", "7").exit_code == 0
    data = json.loads(report.read_text())
    assert data["schema_version"] == 5
    assert set(data["versions"]) == {"onnx-lowrank", "onnx", "onnxruntime", "onnxruntime_builds", "numpy", "scipy"}
    from importlib import metadata

    owner = metadata.packages_distributions()["onnxruntime"]  # the distributions that installed the module
    assert all(name in data["versions"]["onnxruntime_builds"] for name in owner)
    assert data["options"]["seed"] == 7 and data["options"]["speedup"] == 2.0 and data["options"]["bench"] is False
    assert data["files"]["input"]["sha256"] == sha256_of(tiny / "tiny.onnx")
    assert data["files"]["output"]["sha256"] == sha256_of(out)
    assert {"analyse", "collect", "solve", "rewrite", "fidelity", "total"} <= set(data["timings_s"])


def test_quiet_verbose_log_file_and_plain_progress(tiny) -> None:
    args = [tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "2", "--calib", tiny / "calib.npz", "--no-bench"]
    quiet = invoke(*args, "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    logged = invoke(*args, "--log-file", tiny / "run.log")
    assert logged.exit_code == 0 and "plan (asymmetric" in logged.stdout
    # stderr is not a terminal here: progress is plain timestamped lines, a start and an end per stage
    assert any(line[:4].isdigit() and "collecting responses: 0/" in line for line in logged.stderr.splitlines())
    assert any("solving:" in line and "done in" in line for line in logged.stderr.splitlines())
    text = (tiny / "run.log").read_text()
    assert "DEBUG" in text and "INFO" in text and "wrote" in text
    verbose = invoke(*args, "-v")
    assert "loading and analysing the model" in verbose.stderr


def test_version() -> None:
    from onnx_lowrank import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"onnx-lowrank {__version__}"


def test_internal_errors_exit_3_and_are_not_lowrank_errors(tiny, monkeypatch) -> None:
    from onnx_lowrank.errors import InternalError, LowRankError

    assert not issubclass(InternalError, LowRankError)

    def broken(model):
        raise InternalError("the rewritten model does not load")

    monkeypatch.setattr("onnx_lowrank.pipeline.compress._check_rewritten", broken)
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "2", "--calib", tiny / "calib.npz")
    assert result.exit_code == 3 and result.stderr.strip().splitlines()[-1].startswith("internal error: ")
    assert not (tiny / "fast.onnx").exists()


def test_the_error_line_is_in_the_log_file_too(tiny) -> None:
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "1000", "--calib", tiny / "calib.npz",
                    "--log-file", tiny / "run.log")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "error: a 1000x conv speedup cannot be reached" in (tiny / "run.log").read_text()


@pytest.mark.slow
def test_quantize_int8_writes_a_qdq_model_with_the_four_stages(tiny) -> None:
    out, report = tiny / "fast.onnx", tiny / "report.json"
    result = invoke(tiny / "tiny.onnx", out, "--speedup", "2", "--calib", tiny / "calib.npz", "--report", report,
                    "--quantize", "int8", "--int8-calibration", "percentile", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(out).graph.node}
    data = json.loads(report.read_text())
    assert [s["stage"] for s in data["stages"]] == ["original", "low-rank", "low-rank + int8", "int8"]
    assert data["int8"]["calibration"] == "percentile" and "stages" in result.stdout
    assert "Collecting tensor data" not in result.output  # onnxruntime's calibrator prints, captured
    # and the INT8 model it wrote is refused as an input, in one line
    again = invoke(out, tiny / "again.onnx", "--calib", tiny / "calib.npz")
    assert again.exit_code == 2 and not (tiny / "again.onnx").exists()
    assert again.stderr.startswith("error: the model is already quantized") and again.stderr.count("\n") == 1


def test_int8_that_misses_its_tolerance_writes_the_float_model_with_one_warning_line(tiny, monkeypatch) -> None:
    # INT8 noise can lower the error of a low-rank model by chance: here every INT8 model misses
    monkeypatch.setattr("onnx_lowrank.quantize.stages.error_added",
                        lambda reference, floats, limit: lambda outputs: (1.0, False))
    out, report = tiny / "fast.onnx", tiny / "report.json"
    result = invoke(tiny / "tiny.onnx", out, "--speedup", "2", "--calib", tiny / "calib.npz", "--report", report,
                    "--quantize", "int8", "--int8-tolerance", "1e-9", "--threads", "1", "--no-bench")
    assert result.exit_code == 0, result.output
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(out).graph.node}
    warnings = [line for line in result.stderr.splitlines() if "float low-rank model is written" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    data = json.loads(report.read_text())
    assert data["int8"]["written"] == "float" and data["options"]["int8_tolerance"] == 1e-9
    bad = invoke(tiny / "tiny.onnx", tiny / "other.onnx", "--calib", tiny / "calib.npz", "--quantize", "int8",
                 "--int8-tolerance", "-1")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: int8_tolerance must be") and not (tiny / "other.onnx").exists()


def test_objective_latency_keeps_its_cache_where_asked_and_never_over_an_input(tiny) -> None:
    refused = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--calib", tiny / "calib.npz", "--objective", "latency",
                     "--latency-cache", tiny / "calib.npz")
    assert refused.exit_code == 2 and "--latency-cache" in refused.stderr and not (tiny / "fast.onnx").exists()
    # a modest target: this model's convs take microseconds, and its fastest plan moves with the load
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--speedup", "1.1", "--calib", tiny / "calib.npz",
                    "--objective", "latency", "--latency-cache", tiny / "latency.json", "--threads", "1",
                    "--no-bench")
    assert result.exit_code == 0, result.output
    assert "predicted conv speedup" in result.stdout
    assert sorted(p.name for p in tiny.iterdir()) == ["calib.npz", "fast.onnx", "latency.json", "tiny.onnx"]


def test_ops_chooses_the_kinds_decomposed(tiny) -> None:
    # the tiny model's only dense layer is its head, left alone: with the convs out, nothing is left
    result = invoke(tiny / "tiny.onnx", tiny / "fast.onnx", "--calib", tiny / "calib.npz", "--ops", "dense")
    assert result.exit_code == 2 and "conv layers are not in --ops" in result.output
    assert "output layer (a dense head)" in result.output and not (tiny / "fast.onnx").exists()
    bad = invoke(tiny / "tiny.onnx", tiny / "other.onnx", "--ops", "conv,lstm", "--calib", tiny / "calib.npz")
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: unknown op 'lstm'")
    assert not (tiny / "other.onnx").exists()


def test_without_onnxruntime_the_command_says_which_extra_installs_it(monkeypatch, capsys) -> None:
    import importlib.util

    from onnx_lowrank.__main__ import main as command

    real = importlib.util.find_spec
    monkeypatch.setattr("signal.signal", lambda *args: None)  # keep pytest's own Ctrl-C handling
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        command(["in.onnx", "out.onnx"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: onnxruntime is not installed") and "onnx-lowrank[cpu]" in lines[0]
