"""Where one onnx-lowrank run spends its time, by kind of work: onnxruntime running models,
onnxruntime building sessions, NumPy/SciPy arithmetic (the solvers, statistics, sampling),
protobuf and graph building (onnx, graphsurgeon), and the rest; with how many sessions were
built and how many times onnxruntime ran. Runs the command given after ``--`` under cProfile
(which slows Python-heavy code a little; the split, not the total, is the point).

    python tools/profile_run.py -- IN.onnx OUT.onnx --speedup 4 --method asym3d --num-images 64
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict

KINDS = (  # (kind, what a function's file or name contains), first match wins
    ("onnxruntime: running models", ("pybind11_state.run", "run_with_iobinding")),
    ("onnxruntime: building sessions", ("onnxruntime",)),
    ("protobuf, onnx, graphsurgeon: graphs", ("google", "_upb", "/onnx/", "onnx_graphsurgeon", "SerializeToString")),
    # The solver's z-steps run in a thread pool cProfile does not see: the main thread waits on it.
    ("NumPy / SciPy arithmetic", ("numpy", "scipy", "onnx_lowrank/solvers", "onnx_lowrank/methods",
                                  "onnx_lowrank/planning", "onnx_lowrank/runtime/sessions.py", "_thread.lock")),
)


def kind_of(function: tuple) -> str:
    filename, _, name = function
    where = f"{filename}:{name}"
    return next((kind for kind, marks in KINDS if any(mark in where for mark in marks)), "other (Python, I/O, waits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the onnx-lowrank arguments, after --")
    arguments = [a for a in parser.parse_args().arguments if a != "--"]
    from onnx_lowrank.cli.app import main as cli

    profile = cProfile.Profile()
    sys.argv = ["onnx-lowrank", *arguments]
    clock = time.perf_counter()
    profile.enable()
    try:
        cli()
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = 0
    profile.disable()
    wall = time.perf_counter() - clock
    stats = pstats.Stats(profile).stats
    seconds: dict[str, float] = defaultdict(float)
    sessions = runs = 0
    for function, (_, calls, own, _, _) in stats.items():
        seconds[kind_of(function)] += own
        if function[2] == "_create_inference_session":
            sessions += calls
        if function[2].endswith("pybind11_state.run>"):
            runs += calls
    print(f"\nwall {wall:.1f} s (under cProfile); {sessions} onnxruntime sessions built, {runs} runs", file=sys.stderr)
    for kind, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"{value:7.1f} s  {100 * value / wall:5.1f} %  {kind}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
