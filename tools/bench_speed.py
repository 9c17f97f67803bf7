"""How long a run takes and where the time goes (issue 24): each configuration runs through the
CLI of each checkout in a fresh child process, before and after in turn, and keeps the wall time,
the child's peak RSS, the report's time per stage (``timings_s``), the solve's slowest layers, a
budget search's runs by kind (probes, quick runs, full solves) and the fidelity of the answer.

    python tools/bench_speed.py run demo models/digits-vgg.onnx --checkout before=/tmp/pre24 --checkout after=. \\
        --config "--speedup 4 --method asym3d" --config "--max-error 0.02 --method asym3d" \\
        --json benchmarks/issue24/demo.json -- --calib models/digits-calib.npz --eval models/digits-test.npz
    python tools/bench_speed.py render benchmarks/issue24/*.json

Latency is not measured (``--no-bench``): these are the tool's own times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def one_run(checkout: Path, model: str, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "report.json"
        command = [sys.executable, "-m", "onnx_lowrank", str(Path(model).resolve()), str(Path(folder) / "out.onnx"),
                   "--no-bench", "--threads", "2", "-q", "--report", str(report_path), *flags]
        clock = time.perf_counter()
        child = subprocess.Popen(command, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - clock
        if os.waitstatus_to_exitcode(status) != 0:
            return {"exit": os.waitstatus_to_exitcode(status), "stderr": stderr.strip()[-800:], "wall_s": seconds}
        report = json.loads(report_path.read_text())
    solved = sorted(((layer["seconds"]["solve"] + layer["seconds"]["collect"], layer["name"])
                     for layer in report["layers"] if layer.get("seconds")), reverse=True)
    fidelity = report.get("fidelity") or {}
    return {"wall_s": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "timings_s": {k: round(v, 1) for k, v in report["timings_s"].items()},
            "slowest_layers": [[name, round(s, 1)] for s, name in solved[:3]],
            "runs": dict(Counter(_kind(p["solver"]) for p in report.get("frontier") or [])),
            "theoretical_speedup": report.get("theoretical_speedup"),
            "error": max((fidelity.get("output_rel_error") or {}).values(), default=None),
            "agreement": fidelity.get("top1_agreement")}


def _kind(solver: str) -> str:
    return "probe" if solver == "probe" else "quick" if solver.endswith("(quick)") else \
        "infeasible" if solver == "infeasible" else "int8" if "int8" in solver else "full"


def run(args: argparse.Namespace) -> None:
    checkouts = dict(item.split("=", 1) for item in args.checkout)
    rows = []
    for config in args.config:
        for name, checkout in checkouts.items():
            row = {"model": args.name, "config": config, "code": name,
                   **one_run(Path(checkout).resolve(), args.model, [*shlex.split(config), *args.cli])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(rows, indent=1))


def render(paths: list[str]) -> None:
    print("| model | run | code | wall s | peak RSS MiB | stages (s) | runs | speedup (theor.) | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            if "exit" in row:
                print(f"| {row['model']} | `{row['config']}` | {row['code']} | failed: {row['stderr'][-120:]} |||||")
                continue
            stages = ", ".join(f"{k} {v}" for k, v in row["timings_s"].items() if k != "total" and v >= 0.5)
            runs = ", ".join(f"{v} {k}" for k, v in sorted(row["runs"].items())) or "1"
            error = f"{row['error']:.4f}" if row["error"] is not None else ""
            print(f"| {row['model']} | `{row['config']}` | {row['code']} | {row['wall_s']} | {row['peak_rss_mib']} | "
                  f"{stages} | {runs} | {row['theoretical_speedup']:.2f}× | {error} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("name")
    run_parser.add_argument("model")
    run_parser.add_argument("--checkout", action="append", required=True, help="NAME=PATH of a checkout")
    run_parser.add_argument("--config", action="append", required=True, help="the flags of one configuration")
    run_parser.add_argument("--json")
    render_parser = commands.add_parser("render")
    render_parser.add_argument("paths", nargs="+")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.cli = argv[split + 1:]
    run(args) if args.command == "run" else render(args.paths)


if __name__ == "__main__":
    main()
