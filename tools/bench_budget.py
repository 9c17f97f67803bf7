"""Budget runs of the accuracy search against single fixed-speedup runs: the speedup found, the
metric on the held-out part of the calibration data (what the search saw) and on a separate test
set (what it did not), measured latency, and the search's time against one fixed-speedup run at
the speedup it found.

    python tools/bench_budget.py models/digits-vgg.onnx --calib models/digits-calib.npz \\
        --test models/digits-test.npz --budget max-drop=1 --budget max-error=0.03 \\
        --budget max-error=0.06 --json benchmarks/issue11/demo-budget.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def outputs(model: Path, data: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: data[i:i + 64]})[0] for i in range(0, len(data), 64)])


def on_test_set(original: Path, optimized: Path, test: Path) -> dict:
    arrays = np.load(test)
    data = arrays[[k for k in arrays.files if k != "labels"][0]]
    reference, approx = outputs(original, data), outputs(optimized, data)
    result = {"samples": len(data), "output_rel_error": float(np.linalg.norm(reference - approx)
                                                               / np.linalg.norm(reference))}
    if reference.ndim == 2:
        result["top1_agreement"] = float(np.mean(reference.argmax(1) == approx.argmax(1)))
        if "labels" in arrays.files:
            labels = arrays["labels"]
            result["accuracy_drop_points"] = 100 * float(np.mean(reference.argmax(1) == labels)
                                                         - np.mean(approx.argmax(1) == labels))
    return result


def run(command: list[str]) -> tuple[float, str | None]:
    """Wall time of one command, and its error line if it failed (a budget no plan meets, say)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "onnx_lowrank", *command, "-q"], capture_output=True, text=True)
    error = done.stderr.strip().splitlines()[-1] if done.returncode else None
    return time.perf_counter() - start, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--test", type=Path, required=True, help="a separate labelled .npz, never seen by the tool")
    parser.add_argument("--budget", action="append", required=True, help="max-drop=1, max-error=0.03, ...")
    parser.add_argument("--extra", default="", help="more onnx-lowrank options, e.g. '--method asym3d'")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for budget in args.budget:
            flag, limit = budget.split("=")
            out, report = Path(folder) / "budget.onnx", Path(folder) / "budget.json"
            common = [str(args.model), "--calib", args.calib, *args.extra.split()]
            search_s, error = run([common[0], str(out), *common[1:], f"--{flag}", limit, "--report", str(report)])
            if error is not None:
                rows.append({"budget": budget, "met": False, "error": error, "search_s": search_s})
                print(json.dumps(rows[-1]))
                continue
            data = json.loads(report.read_text())
            speedup = data["theoretical_speedup"]
            single_s, _ = run([common[0], str(Path(folder) / "single.onnx"), *common[1:], "--speedup",
                               str(data["speedup_target"]), "--report", str(Path(folder) / "single.json")])
            rows.append({"budget": data["budget"]["target"], "theoretical_speedup": speedup,
                         "measured_speedup_cpu": data["actual_speedup"].get("cpu"),
                         "held_out": {"samples": data["budget"]["held_out_samples"],
                                      "value": data["budget"]["measured"]},
                         "test": on_test_set(args.model, out, args.test), "search_s": search_s,
                         "single_run_s": single_s, "frontier": data["frontier"]})
            print(json.dumps(rows[-1] | {"frontier": len(rows[-1]["frontier"])}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
