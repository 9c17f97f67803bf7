"""A user's files are sacred: the tool writes OUT (and its data file) and the report, atomically,
never over an input, and nothing at all when it fails or is interrupted."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_lowrank.graph import io as model_io
from onnx_lowrank.output.provenance import sha256_of
from tests.builders import relative_error, run_model
from tests.test_cli import invoke

RUN = ["--speedup", "1.5", "--no-bench", "--threads", "1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def assert_refused(folder: Path, args: list, message: str) -> None:
    before = snapshot(folder)
    result = invoke(*args, "--calib", folder / "calib.npz", *RUN)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", ["report-is-input", "report-is-out", "out-symlink-to-input", "out-hard-link",
                                  "out-dotdot-spelling", "report-symlink-to-input", "log-is-input", "report-is-log"])
def test_no_output_may_be_the_input_or_another_output(folder, case) -> None:
    inp, out = folder / "in.onnx", folder / "out.onnx"
    (folder / "sub").mkdir()
    os.symlink(inp, folder / "link.onnx")
    os.link(inp, folder / "hard.onnx")
    args = {
        "report-is-input": ([inp, out, "--report", inp], "is the input model"),
        "report-is-out": ([inp, out, "--report", out], "is OUT"),
        "out-symlink-to-input": ([inp, folder / "link.onnx"], "is the input model"),
        "out-hard-link": ([inp, folder / "hard.onnx"], "is the input model"),
        "out-dotdot-spelling": ([inp, folder / "sub" / ".." / "in.onnx"], "is the input model"),
        "report-symlink-to-input": ([inp, out, "--report", folder / "link.onnx"], "is the input model"),
        "log-is-input": ([inp, out, "--log-file", folder / "sub" / ".." / "in.onnx"], "is the input model"),
        "report-is-log": ([inp, out, "--report", folder / "r.txt", "--log-file", folder / "r.txt"], "is --report"),
    }[case]
    assert_refused(folder, *args)


def test_no_output_may_be_a_data_file_or_a_file_in_a_data_folder(folder) -> None:
    from PIL import Image

    (folder / "photos").mkdir()
    Image.new("RGB", (12, 12)).save(folder / "photos" / "a.png")
    (folder / "reader.py").write_text("class R:\n    def get_next(self):\n        return None\n")
    assert_refused(folder, [folder / "in.onnx", folder / "out.onnx", "--report", folder / "calib.npz"],
                   "is the --calib file")
    (folder / "score.py").write_text("def score(a, b, labels):\n    return 1.0\n")
    metric = ["--metric", f"{folder / 'score.py'}:score", "--min-metric", "0.5"]
    before = snapshot(folder)
    for args in ([folder / "in.onnx", folder / "out.onnx", "--calib", folder / "photos", "--report",
                  folder / "photos" / "a.png"],
                 [folder / "in.onnx", folder / "out.onnx", "--calib", f"{folder / 'reader.py'}:R", "--log-file",
                  folder / "reader.py"],
                 [folder / "in.onnx", folder / "out.onnx", *metric, "--report", folder / "score.py"],
                 [folder / "in.onnx", folder / "out.onnx", *metric, "--log-file", folder / "score.py"],
                 [folder / "in.onnx", folder / "out.onnx", *metric, "--objective", "latency", "--method", "linear",
                  "--latency-cache", folder / "score.py"],
                 [folder / "in.onnx", folder / "out.onnx", "--objective", "latency", "--method", "linear",
                  "--latency-cache", folder / "same.json", "--report", folder / "same.json"]):
        result = invoke(*args, *RUN)
        assert result.exit_code == 2 and "refusing to write over" in result.stderr, result.output
    assert snapshot(folder) == before


def external_input(folder: Path, data_name: str) -> Path:
    model = onnx.load(str(folder / "in.onnx"))
    onnx.save(model, str(folder / "ext.onnx"), save_as_external_data=True, location=data_name, size_threshold=0)
    return folder / "ext.onnx"


def test_out_data_file_may_not_be_an_input_data_file(folder) -> None:
    model = external_input(folder, "out.onnx.data")
    assert_refused(folder, [model, folder / "out.onnx"], "is an external-data file of the input model")


def test_report_may_not_be_an_input_data_file(folder) -> None:
    model = external_input(folder, "weights.bin")
    assert_refused(folder, [model, folder / "out.onnx", "--report", folder / "weights.bin"],
                   "external-data file of the input model")


@pytest.mark.parametrize("case", ["parent-is-file", "report-is-directory", "not-writable", "not-onnx-suffix"])
def test_unwritable_outputs_are_refused_before_any_work(folder, case, monkeypatch) -> None:
    inp = folder / "in.onnx"
    (folder / "dir").mkdir()
    if case == "not-writable":  # the tests run as root, whom permission bits do not stop
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder / "dir"
                            else real_access(path, mode))
    args = {
        "parent-is-file": ([inp, folder / "in.onnx" / "out.onnx"], "is not a directory"),
        "report-is-directory": ([inp, folder / "out.onnx", "--report", folder / "dir"], "is a directory"),
        "not-writable": ([inp, folder / "dir" / "out.onnx"], "is not writable"),
        "not-onnx-suffix": ([inp, folder / "out.txt"], "must end in .onnx"),
    }[case]
    assert_refused(folder, *args)


def test_outputs_get_the_umask_mode_and_a_replaced_file_keeps_its_own(folder) -> None:
    old = os.umask(0o022)
    try:
        assert invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz",
                      "--report", folder / "r.json", *RUN).exit_code == 0
        assert (folder / "out.onnx").stat().st_mode & 0o777 == 0o644
        assert (folder / "r.json").stat().st_mode & 0o777 == 0o644
        os.chmod(folder / "out.onnx", 0o640)
        os.umask(0o077)
        assert invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN).exit_code == 0
        assert (folder / "out.onnx").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_missing_output_folders_are_created_and_removed_again_on_failure(folder, monkeypatch) -> None:
    out = folder / "a" / "b" / "out.onnx"
    assert invoke(folder / "in.onnx", out, "--calib", folder / "calib.npz", *RUN).exit_code == 0
    assert out.is_file()
    monkeypatch.setattr("onnx_lowrank.output.staging.write_model", _disk_full)
    result = invoke(folder / "in.onnx", folder / "c" / "d" / "out.onnx", "--calib", folder / "calib.npz", *RUN)
    assert result.exit_code == 2 and "No space left" in result.stderr
    assert not (folder / "c").exists()


def _disk_full(model, path, data_name):
    (path.parent / data_name).write_bytes(b"partial")
    path.write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_nothing_and_the_next_run_succeeds(folder, monkeypatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    before = snapshot(folder)
    monkeypatch.setattr("onnx_lowrank.output.staging.write_model", _disk_full)
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN)
    assert result.exit_code == 2 and "error: could not write" in result.stderr
    assert snapshot(folder) == before
    monkeypatch.undo()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    assert invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN).exit_code == 0
    assert sorted(set(snapshot(folder)) - set(before)) == ["out.onnx", "out.onnx.data"]


@pytest.mark.parametrize("threshold", [40_000, 1024])
def test_large_models_go_through_external_data_end_to_end(folder, monkeypatch, threshold) -> None:
    """The > 2 GiB path (weights kept on disk, sessions from files with external data, the output as
    a model + data pair), exercised with a low threshold: at 40 kB the model is "large" but its
    sub-graphs and its output are not. The written model is the same as an in-memory run's."""
    x = np.random.default_rng(3).standard_normal((4, 3, 10, 10)).astype(np.float32)
    args = [folder / "out.onnx", "--calib", folder / "calib.npz", "--report", folder / "r.json", *RUN]
    assert invoke(folder / "in.onnx", *args).exit_code == 0
    small = run_model(onnx.load(str(folder / "out.onnx")), {"input": x})[0]
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", threshold)
    external_input(folder, "in.weights")
    result = invoke(folder / "ext.onnx", *args)
    assert result.exit_code == 0, result.output
    large = run_model(onnx.load(str(folder / "out.onnx")), {"input": x})[0]
    assert relative_error(small, large) < 1e-5
    files = json.loads((folder / "r.json").read_text())["files"]
    assert files["output"]["sha256"] == sha256_of(folder / "out.onnx")
    assert files["input"]["external_data"] == {str(folder / "in.weights"): sha256_of(folder / "in.weights")}
    if threshold > 1024:
        assert not (folder / "out.onnx.data").exists()
        return
    assert (folder / "out.onnx.data").is_file() and (folder / "out.onnx").stat().st_size < 4096
    assert files["output"]["external_data"] == {str(folder / "out.onnx.data"): sha256_of(folder / "out.onnx.data")}
    monkeypatch.undo()  # a small model replacing the large OUT takes its stale data file with it
    assert invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN).exit_code == 0
    assert not (folder / "out.onnx.data").exists()
    assert not [p for p in folder.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("where", ["compress", "staging-model", "staging-report"])
def test_an_interrupt_at_any_stage_writes_nothing(folder, monkeypatch, where) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"compress": "onnx_lowrank.pipeline.compress.benchmark_providers", "staging-model": "onnx_lowrank.output.staging.write_model",
              "staging-report": "onnx_lowrank.output.report.Report.to_json"}[where]
    monkeypatch.setattr(target, interrupt)
    before = snapshot(folder)
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz",
                    "--report", folder / "r.json", "--speedup", "1.5", "--threads", "1")
    assert result.exit_code == 130, result.output
    assert "nothing was written" in result.stderr
    assert snapshot(folder) == before


def test_a_signal_after_the_outputs_are_committed_is_ignored(folder, monkeypatch) -> None:
    monkeypatch.setattr("onnx_lowrank.output.report.render", lambda report, console: os.kill(os.getpid(), signal.SIGINT))
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN)
    assert result.exit_code == 0 and (folder / "out.onnx").is_file()


def test_sigterm_during_the_run_exits_143_and_writes_nothing(folder, monkeypatch) -> None:
    monkeypatch.setattr("onnx_lowrank.pipeline.compress._check_rewritten", lambda model: os.kill(os.getpid(), signal.SIGTERM))
    before = snapshot(folder)
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN)
    assert result.exit_code == 143 and snapshot(folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_real_signal_to_the_command_mid_run(folder, signum) -> None:
    process = subprocess.Popen([sys.executable, "-m", "onnx_lowrank", folder / "in.onnx", folder / "out.onnx",
                                "--calib", folder / "calib.npz", "--report", folder / "r.json", "--speedup", "1.5"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "collecting responses" in line:
            process.send_signal(signum)
            break
    process.wait(timeout=60)
    assert process.returncode == 128 + signum
    assert sorted(p.name for p in folder.iterdir()) == ["calib.npz", "in.onnx"]


def test_a_device_is_never_replaced_by_an_output(folder) -> None:
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--report", "/dev/null",
                    *RUN)
    assert result.exit_code == 2 and "not a regular file" in result.stderr
    assert Path("/dev/null").is_char_device()
    logged = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--log-file",
                    "/dev/null", *RUN)
    assert logged.exit_code == 0 and Path("/dev/null").is_char_device()


def test_running_out_of_memory_is_bad_input_not_a_bug(folder, monkeypatch) -> None:
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("onnx_lowrank.pipeline.analysis.collect_responses", exhausted)
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *RUN)
    assert result.exit_code == 2 and "out of memory" in result.stderr and not (folder / "out.onnx").exists()


def test_a_model_without_external_data_is_not_parsed_to_find_its_files(folder, monkeypatch) -> None:
    """The files an input's tensors live in are found by parsing it, but only where the file holds
    the key every reference names its file under: without it there are none."""
    from onnx_lowrank.graph import io

    with_data = external_input(folder, "weights.bin")
    assert io.external_data_files(with_data) == [folder / "weights.bin"]
    monkeypatch.setattr(io.onnx, "load", lambda *args, **kwargs: pytest.fail("parsed"))
    assert io.external_data_files(folder / "in.onnx") == []
