"""Rank selection compared at the same targets: energy (Eq. 13-14) vs measured sensitivity, with
fidelity on a labelled test set the tool sees as --eval only, and the selection's own time.

    python tools/bench_selection.py models/digits-vgg.onnx --calib models/digits-calib.npz \\
        --eval models/digits-test.npz --speedups 2 3 4 --json benchmarks/issue11/demo-selection.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--selections", nargs="+", default=["energy", "sensitivity"])
    parser.add_argument("--extra", default="", help="more onnx-lowrank options")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for speedup in args.speedups:
            for selection in args.selections:
                report = Path(folder) / "r.json"
                subprocess.run([sys.executable, "-m", "onnx_lowrank", args.model, str(Path(folder) / "o.onnx"),
                                "--speedup", str(speedup), "--calib", args.calib, "--eval", args.eval,
                                "--rank-selection", selection, "--report", str(report), "-q", *args.extra.split()],
                               check=True)
                data = json.loads(report.read_text())
                fidelity = data["fidelity"]
                rows.append({"speedup": speedup, "selection": selection,
                             "theoretical_conv_speedup": data["theoretical_conv_speedup"],
                             "measured_speedup_cpu": data["actual_speedup"].get("cpu"),
                             "output_rel_error": next(iter(fidelity["output_rel_error"].values())),
                             "top1_agreement": fidelity["top1_agreement"],
                             "accuracy": [fidelity["accuracy_original"], fidelity["accuracy_optimized"]],
                             "ranks": {layer["name"]: layer["rank"] for layer in data["layers"]},
                             "selection_s": data["timings_s"].get("sensitivity", 0.0),
                             "total_s": data["timings_s"]["total"]})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "ranks"}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
