"""Distillation (issue 23): runs the CLI with and without ``--distill`` at each speedup and method,
and keeps what the report says: worst output error, top-1 agreement and accuracy on the disjoint
--eval data, the measured latency, the distillation's steps, time and held-out error before/after.

    python tools/bench_distill.py run demo models/digits-vgg.onnx --speedups 2 3 4 --methods asymmetric asym3d \\
        --json benchmarks/issue23/demo.json -- --calib models/digits-calib.npz --eval models/digits-test.npz
    python tools/bench_distill.py render benchmarks/issue23/*.json

Arguments after ``--`` go to every run; ``--variant NAME='--flag value ...'`` adds a distilled run
with those flags (the ablations: --distill-all-weights, fewer --num-images, ...).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(model: str, speedup: float, method: str, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "report.json"
        command = [sys.executable, "-m", "onnx_lowrank", str(Path(model).resolve()), str(Path(folder) / "out.onnx"),
                   "--speedup", str(speedup), "--method", method, "--threads", "2", "--bench-batch", "1",
                   "--report", str(report_path), "-q", *flags]
        clock = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - clock
        if done.returncode != 0:
            return {"exit": done.returncode, "stderr": done.stderr.strip()[-1500:], "run_s": seconds}
        report = json.loads(report_path.read_text())
    fidelity = report.get("fidelity") or {}
    latency = (report.get("latency_ms") or {}).get("cpu") or {}
    return {"error": max((fidelity.get("output_rel_error") or {}).values(), default=None),
            "agreement": fidelity.get("top1_agreement"), "accuracy": fidelity.get("accuracy_optimized"),
            "speedup": (report.get("actual_speedup") or {}).get("cpu"), "latency_ms": latency.get("optimized"),
            "distill": report.get("distill"), "run_s": round(seconds, 1), "timings_s": report.get("timings_s")}


def run(args: argparse.Namespace) -> None:
    variants = {"plain": [], "distilled": ["--distill"]}
    for text in args.variant:
        name, flags = text.split("=", 1)
        variants[name] = ["--distill", *shlex.split(flags)]
    rows = []
    for method in args.methods:
        for speedup in args.speedups:
            for name, flags in variants.items():
                row = {"model": args.name, "method": method, "target": speedup, "variant": name,
                       **one_run(args.model, speedup, method, [*flags, *args.cli])}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("distill", "timings_s")}), flush=True)
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(rows, indent=1))


def render(args: argparse.Namespace) -> None:
    print("| model | method | target | variant | output error | agreement | measured speedup | distillation |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.files:
        for row in json.loads(Path(path).read_text()):
            if "exit" in row:
                print(f"| {row['model']} | {row['method']} | {row['target']}× | {row['variant']} | exit {row['exit']} | | | |")
                continue
            distill = row.get("distill") or {}
            what = ""
            if distill:
                error = distill.get("held_out_error") or {}
                what = (f"{distill.get('steps', 0)} steps, {distill.get('seconds', 0):.0f} s, "
                        f"{'written' if distill.get('applied') else 'not written: ' + distill.get('reason', '')}"
                        + (f" ({error['before']:.4f} → {error['after']:.4f})" if error else ""))
            agreement = f"{100 * row['agreement']:.1f} %" if row.get("agreement") is not None else "-"
            speed = f"{row['speedup']:.2f}×" if row.get("speedup") else "-"
            print(f"| {row['model']} | {row['method']} | {row['target']}× | {row['variant']} | {row['error']:.4f} | "
                  f"{agreement} | {speed} | {what} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("name")
    runner.add_argument("model")
    runner.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    runner.add_argument("--methods", nargs="+", default=["asymmetric", "asym3d"])
    runner.add_argument("--variant", action="append", default=[])
    runner.add_argument("--json")
    renderer = commands.add_parser("render")
    renderer.add_argument("files", nargs="+")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.cli = argv[split + 1:]
    (run if args.command == "run" else render)(args)


if __name__ == "__main__":
    main()
