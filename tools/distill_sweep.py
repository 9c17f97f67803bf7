"""Distillation ablations on one model (issue 23): the model is analysed and solved once, then
distilled under each setting, and the held-out error before/after, steps and time are kept.

    python tools/distill_sweep.py /tmp/craft.onnx --speedup 4 --method asymmetric --seconds 300 \\
        --setting base --setting step=5e-4 --setting outputs-only --setting all-weights \\
        --json benchmarks/issue23/craft-ablations.json -- --calib /tmp/text-calib --eval /tmp/text-eval --num-images 48

A setting is ``base``, ``step=X`` (Adam's relative step), ``outputs-only`` (no hints),
``all-weights``, ``samples=N`` (the first N training samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from onnx_lowrank.distill import stage, train
from onnx_lowrank.options import Options
from onnx_lowrank.pipeline.analysis import analyse
from onnx_lowrank.pipeline.compress import hint_tensors, rewrite, solve
from onnx_lowrank.pipeline.plan import plan_for
from onnx_lowrank.runtime.images import make_preprocess


def parse_cli(extra: list[str]) -> dict:
    """The few data flags the sweep passes through: --calib, --eval, --num-images, --preprocess ..."""
    keys = {"--calib": "calibration", "--eval": "evaluation", "--num-images": "num_images", "--augment": "augment",
            "--preprocess": "preset", "--scale": "scale", "--mean": "mean", "--std": "std", "--ops": "ops",
            "--rank-multiple": "rank_multiple"}
    given = dict(zip(extra[::2], extra[1::2]))
    out = {keys[k]: v for k, v in given.items() if k in keys}
    for name in ("num_images", "augment", "rank_multiple"):
        if name in out:
            out[name] = int(out[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--speedup", type=float, default=4.0)
    parser.add_argument("--method", default="asymmetric")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--setting", action="append", default=[])
    parser.add_argument("--json")
    parser.add_argument("--device", default="cpu", help="--distill-device")
    parser.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    data = parse_cli(argv[split + 1:])
    preprocess = make_preprocess(data.pop("preset", "imagenet"),
                                 [float(v) for v in data.pop("mean").split(",")] if "mean" in data else None,
                                 [float(v) for v in data.pop("std").split(",")] if "std" in data else None,
                                 float(data.pop("scale")) if "scale" in data else None, None)
    calibration, evaluation = data.pop("calibration", None), data.pop("evaluation", None)
    opts = Options(speedup=args.speedup, method=args.method, bench=False, threads=args.threads, distill=True,
                   distill_time=args.seconds, distill_device=args.device, **data)
    analysis = analyse(args.model, opts, calibration, evaluation, preprocess)
    plan = plan_for(analysis, opts)
    solved = solve(analysis, plan, opts)
    optimized = rewrite(analysis, solved)
    hints = hint_tensors(analysis, solved)
    measuring = analysis.measuring()
    rows = []
    for setting in args.setting or ["base"]:
        step, keep_hints, run_opts, limit = train.RELATIVE_STEP, hints, opts, None
        if setting.startswith("step="):
            step = float(setting.split("=", 1)[1])
        elif setting == "outputs-only":
            keep_hints = []
        elif setting == "all-weights":
            run_opts = dataclasses.replace(opts, distill_all_weights=True)
        elif setting.startswith("samples="):
            limit = int(setting.split("=", 1)[1])
        saved_step, saved_data = train.RELATIVE_STEP, measuring.data
        train.RELATIVE_STEP = step
        if limit is not None:
            measuring = dataclasses.replace(measuring, data=dataclasses.replace(
                saved_data, calib_indices=saved_data.calib_indices[:limit]))
        clock = time.perf_counter()
        distilled = stage.distill(measuring, optimized, keep_hints, run_opts)
        train.RELATIVE_STEP, measuring = saved_step, dataclasses.replace(measuring, data=saved_data)
        section = distilled.section
        row = {"model": Path(args.model).name, "speedup": args.speedup, "method": args.method, "setting": setting,
               "device": args.device, "threads": args.threads,
               "seconds": round(time.perf_counter() - clock, 1),
               **{k: section.get(k) for k in ("applied", "reason", "steps", "best_step", "stopped", "held_out_error",
                                              "train_samples", "parameters")},
               "history": section.get("history")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
