"""The options that touch files and the budget's inputs, tried as a hostile pipeline would: each is
one `error: …` line and exit 2 with every file as it was, or a correct run."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from onnx_lowrank import Budget, compress_to_budget
from onnx_lowrank.errors import InvalidOptionError, InvalidTypeError
from onnx_lowrank.measure.latency_cache import LatencyCache
from tests.builders import Layer, conv_net
from tests.test_cli import invoke
from tests.test_hostile import RUN, one_error
from tests.test_outputs import snapshot

LATENCY = ["--objective", "latency", "--method", "linear", "--bench-rounds", "15"]


@pytest.mark.parametrize("text", ['{"version": 1, "name": "my settings"}', '{"version": 1, "entries": {}, "owner": "me"}',
                                  '{"format": "onnx-lowrank latency cache", "version": 1, "entries": {"k": -1}}',
                                  '{"format": "onnx-lowrank latency cache", "version": 1, "entries": {"k": NaN}}'])
def test_a_json_file_that_is_not_our_cache_is_never_replaced(folder, text: str) -> None:
    (folder / "settings.json").write_text(text)
    one_error(folder, "--calib", folder / "calib.npz", *LATENCY, "--latency-cache", folder / "settings.json",
              message="is not a latency cache of onnx-lowrank")


def test_a_cache_of_ours_of_an_older_version_is_reread_as_empty(tmp_path) -> None:
    (tmp_path / "cache.json").write_text('{"format": "onnx-lowrank latency cache", "version": 0, "entries": {}}')
    assert LatencyCache.open(tmp_path / "cache.json").entries == {}


def test_the_cache_is_written_only_when_the_run_succeeds_with_the_mode_of_a_new_file(folder) -> None:
    cache = folder / "new" / "folder" / "cache.json"
    failed = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *LATENCY,
                    "--latency-cache", cache, "--max-error", "1e-9", "--no-bench", "--threads", "1")
    assert failed.exit_code == 2 and "no decomposition" in failed.stderr, failed.output
    assert not cache.exists() and not (folder / "out.onnx").exists()
    done = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", *LATENCY,
                  "--latency-cache", cache, *RUN, "--speedup", "1.01")
    assert done.exit_code == 0, done.output
    umask = os.umask(0)
    os.umask(umask)
    assert json.loads(cache.read_text())["entries"] and stat.S_IMODE(cache.stat().st_mode) == 0o666 & ~umask


def test_a_latency_cache_without_the_latency_objective_is_refused(folder) -> None:
    one_error(folder, "--calib", folder / "calib.npz", "--latency-cache", folder / "c.json",
              message="--latency-cache keeps the layer timings of --objective latency")


def test_a_log_file_in_a_missing_folder_is_made(folder) -> None:
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--log-file",
                    folder / "logs" / "run.log", *RUN)
    assert result.exit_code == 0, result.output
    assert "wrote" in (folder / "logs" / "run.log").read_text()


@pytest.mark.parametrize("script, message", [
    ("import sys\ndef score(a, b, labels):\n    sys.exit(0)\n", "the metric"),
    ("def score(a, b, labels):\n    return float('nan')\n", "returned nan, not a finite number"),
    ("def score(a, b, labels):\n    return 'high'\n", "the metric"),
])
def test_a_metric_that_exits_or_returns_no_number_ends_the_run_with_an_error(folder, script: str,
                                                                              message: str) -> None:
    (folder / "score.py").write_text(script)
    before = snapshot(folder)
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--metric",
                    f"{folder / 'score.py'}:score", "--min-metric", "0.5", *RUN)
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith("error: ") and message in last, result.output
    assert snapshot(folder) == before


def test_a_metric_without_its_function_name_is_one_line(folder) -> None:
    (folder / "score.py").write_text("def score(a, b, labels):\n    return 1.0\n")
    one_error(folder, "--calib", folder / "calib.npz", "--metric", folder / "score.py", "--min-metric", "0.5",
              message="--metric takes FILE.py:FUNCTION")


def test_the_error_budget_is_the_worst_output() -> None:
    reference = {"a": np.ones((4, 3), np.float32), "b": np.ones((4, 3), np.float32)}
    candidate = {"a": reference["a"].copy(), "b": reference["b"] * 1.25}
    assert Budget("error", 0.1).value(reference, candidate, None) == pytest.approx(0.25)


def test_a_budget_takes_any_real_number_and_refuses_anything_else() -> None:
    assert Budget("error", np.float32(0.5)).limit == 0.5 and type(Budget("error", np.float32(0.5)).limit) is float
    with pytest.raises(InvalidTypeError, match="budget must be a Budget"):
        compress_to_budget(conv_net([Layer(8)]), 0.1)


def test_library_and_cli_options_are_the_same_set_with_the_same_checks(folder) -> None:
    one_error(folder, "--calib", folder / "calib.npz", "--bench-rounds", "5", message="bench_rounds must be at least 15")
    one_error(folder, "--calib", folder / "calib.npz", "--holdout", "0", message="holdout must be at least 1")
    with pytest.raises(InvalidTypeError, match="did you mean 'holdout'"):
        compress_to_budget(conv_net([Layer(8)]), Budget("error", 0.1), hold_out=10)
    with pytest.raises(InvalidOptionError, match="bench_rounds must be at least 15"):
        compress_to_budget(conv_net([Layer(8)]), Budget("error", 0.1), bench_rounds=3)


def test_every_option_reaches_the_report(folder) -> None:
    before = snapshot(folder)
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--holdout", "9",
                    "--batch-size", "4", "--report", folder / "r.json", *RUN)
    assert result.exit_code == 0, result.output
    options = json.loads((folder / "r.json").read_text())["options"]
    assert options["holdout"] == 9 and options["batch_size"] == 4 and options["speedup"] == 1.5
    assert set(snapshot(folder)) - set(before) == {"out.onnx", "r.json"}
