"""INT8 before/after the accuracy guard (issue 21): runs the CLI with ``--quantize int8`` at 1
thread, batch 1, and keeps what the report says of every stage (worst output error and top-1
agreement on the disjoint --eval data, latency measured interleaved in the run), the nodes kept
in float, and what the guard cost.

    python tools/bench_int8_guard.py run demo models/digits-vgg.onnx --speedups 2 4 \\
        --json benchmarks/issue21/demo.json -- --calib models/digits-calib.npz --eval models/digits-test.npz
    # the code before the guard, from a checkout of it:
    python tools/bench_int8_guard.py run demo ... --checkout /tmp/before --json benchmarks/issue21/demo-before.json -- ...
    python tools/bench_int8_guard.py render benchmarks/issue21/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    rows = []
    for speedup in args.speedups:
        with tempfile.TemporaryDirectory() as folder:
            report_path = Path(folder) / "report.json"
            command = [sys.executable, "-m", "onnx_lowrank", str(Path(args.model).resolve()),
                       str(Path(folder) / "out.onnx"),
                       "--speedup", str(speedup), "--quantize", "int8", "--threads", "1", "--bench-batch", "1",
                       "--report", str(report_path), "-q", *args.cli]
            env = dict(os.environ, PYTHONPATH=args.checkout) if args.checkout else None
            clock = time.perf_counter()
            # -m puts the working folder first on the path: run in the checkout, so it is the code that runs
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=args.checkout)
            seconds = time.perf_counter() - clock
            if done.returncode != 0:
                rows.append({"speedup": speedup, "exit": done.returncode, "stderr": done.stderr.strip()[-2000:]})
                continue
            report = json.loads(report_path.read_text())
        rows.append({"speedup": speedup, "exit": 0, "seconds": seconds, "theoretical": report["theoretical_speedup"],
                     "timings_s": report["timings_s"], "stages": [_stage(s) for s in report["stages"]],
                     "int8": report["int8"], "warnings": report["warnings"]})
        print(json.dumps(rows[-1]["stages"], indent=1), file=sys.stderr)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"name": args.name, "model": args.model, "cli": args.cli,
                                           "checkout": args.checkout, "rows": rows}, indent=1))


def _stage(stage: dict) -> dict:
    fidelity = stage["fidelity"]
    return {"stage": stage["stage"], "error": max(fidelity["output_rel_error"].values()),
            "top1": fidelity.get("top1_agreement"), "samples": fidelity["samples"],
            "p50_ms": (stage["latency_ms"].get("cpu") or {}).get("p50"), "written": stage.get("written"),
            "kept_float": stage.get("kept_float")}


def render(paths: list[str]) -> None:
    print("| model | code | target | stage | output error | top-1 agr. | measured speedup (1 thr, b1) | "
          "kept in float | guard s | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        data = json.loads(Path(path).read_text())
        code = "before" if data["checkout"] else "after"
        for row in data["rows"]:
            if row["exit"]:
                print(f"| {data['name']} | {code} | {row['speedup']:g}× | exit {row['exit']} | | | | | | |")
                continue
            base = row["stages"][0]["p50_ms"]
            for stage in row["stages"][1:]:
                kept, guard = _kept(row["int8"], stage["stage"])
                speed = f"{base / stage['p50_ms']:.2f}×" if base and stage["p50_ms"] else "-"
                top1 = "-" if stage["top1"] is None else f"{100 * stage['top1']:.1f} %"
                mark = " → OUT" if stage.get("written") else ""
                print(f"| {data['name']} | {code} | {row['speedup']:g}× | {stage['stage']}{mark} | "
                      f"{stage['error']:.4f} | {top1} | {speed} | {kept} | {guard} | {row['seconds']:.0f} |")


def _kept(int8: dict, stage: str) -> tuple[str, str]:
    """The nodes kept in float for an INT8 stage (either report schema), and the guard's seconds."""
    if not stage.startswith(("low-rank + int8", "int8")) or stage.endswith("all nodes"):
        return "", ""
    alone = stage.startswith("int8")
    if "guard" not in int8:  # before the guard: nodes sent back by the -20 dB activation rule
        kept = int8["kept_float_int8_alone" if alone else "kept_float"]
        return (", ".join(sorted(kept)) or "none") + " (SQNR rule)", ""
    section = int8["int8_alone"] if alone else int8
    kept = section["kept_float"]
    text = ", ".join(f"{name} ({why['reason']})" for name, why in kept.items()) or "none"
    return text, f"{section['guard']['seconds']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("name")
    runner.add_argument("model")
    runner.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0])
    runner.add_argument("--checkout", help="run the code of this checkout (PYTHONPATH) instead of the installed one")
    runner.add_argument("--json", required=True)
    renderer = commands.add_parser("render")
    renderer.add_argument("paths", nargs="+")
    args, cli = parser.parse_known_args()  # what follows -- goes to the CLI (--calib, --eval, ...)
    if args.command == "run":
        args.cli = [a for a in cli if a != "--"]
        run(args)
    else:
        render(args.paths)


if __name__ == "__main__":
    main()
