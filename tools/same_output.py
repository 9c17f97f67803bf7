"""Behaviour unchanged: run the CLI of two checkouts on the same model and data for every method
(fixed seed, no timing) and compare what they wrote: OUT byte for byte (SHA-256), and the JSON
report with its timings, versions and file paths left out.

    python tools/same_output.py /tmp/before . -- models/digits-vgg.onnx --calib models/digits-calib.npz \\
        --eval models/digits-test.npz --no-bench --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("asymmetric", "asym3d", "nonlinear", "linear", "jaderberg", "svd", "tucker2")
VOLATILE = ("timings_s", "peak_memory_mib", "versions", "files")
VOLATILE_PER_LAYER = ("seconds",)


def run(checkout: Path, model: str, cli: list[str], method: str, folder: Path) -> tuple[str, dict] | str:
    out, report = folder / f"{checkout.name}-{method}.onnx", folder / f"{checkout.name}-{method}.json"
    done = subprocess.run([sys.executable, "-m", "onnx_lowrank", str(Path(model).resolve()), str(out),
                           "--method", method, "--report", str(report), "-q", *cli],
                          cwd=checkout, capture_output=True, text=True)  # -m runs the checkout's own code
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    data = {k: v for k, v in json.loads(report.read_text()).items() if k not in VOLATILE}
    data["layers"] = [{k: v for k, v in layer.items() if k not in VOLATILE_PER_LAYER} for layer in data["layers"]]
    return hashlib.sha256(out.read_bytes()).hexdigest(), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args, cli = parser.parse_known_args()
    cli = [a for a in cli if a != "--"]
    model, cli = cli[0], cli[1:]
    cli = [str(Path(a).resolve()) if Path(a).exists() else a for a in cli]
    differ = 0
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            results = [run(c.resolve(), model, cli, method, Path(folder)) for c in (args.before, args.after)]
            if isinstance(results[0], str) or isinstance(results[1], str):
                same = results[0] == results[1]
                print(f"{method:11s} {'same failure' if same else 'DIFFERENT'}: {results}")
            else:
                same_model, same_report = results[0][0] == results[1][0], results[0][1] == results[1][1]
                same = same_model and same_report
                print(f"{method:11s} OUT sha256 {results[0][0][:16]} {'=' if same_model else '!='} {results[1][0][:16]}, "
                      f"report {'identical' if same_report else 'DIFFERENT'} (timings, versions, paths left out)")
            differ += not same
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
