"""FLOP-planned vs latency-planned plans, and INT8 on top, measured as whole-model latency.

For each target speedup the model is compressed twice (``--objective flops`` and ``latency``,
layers profiled at 1 thread, batch 1; with ``--with-3d`` also the latency plan of ``asym3d``)
and once with ``--quantize int8`` on the FLOP plan. "conv time" is the summed kernel time of the
linear ops (onnxruntime's profiler, 1 thread), the figure a latency plan aims at. Every
model is then timed interleaved with the original on the CPU provider at 1 thread / default
threads and batch 1 / 8 (medians of ``--rounds``); the models are saved to ``--keep`` so that
``tools/bench_providers.py`` can time them on another provider (OpenVINO, CUDA) in its own venv.

    python tools/bench_latency.py models/digits-vgg.onnx --calib models/digits-calib.npz \\
        --eval models/digits-test.npz --speedups 2 3 4 --keep /tmp/lat-demo \\
        --json benchmarks/issue12/demo.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_lowrank import compress
from onnx_lowrank.errors import InfeasibleTargetError
from onnx_lowrank.measure.fidelity import interleaved_times
from onnx_lowrank.measure.latency import Device, linear_op_times, rank_grid
from onnx_lowrank.quantize import Int8Quantizer, SourceReader
from onnx_lowrank.runtime.calibration import model_inputs, open_calibration

SETTINGS = [("1 thread, batch 1", 1, 1), ("default threads, batch 1", 0, 1), ("default threads, batch 8", 0, 8)]


def timings(original, models: dict[str, onnx.ModelProto], sample: dict[str, np.ndarray], rounds: int) -> dict:
    result = {}
    for label, threads, batch in SETTINGS:
        feeds = {name: np.repeat(value[:1], batch, axis=0) for name, value in sample.items()}
        times = interleaved_times([original, *models.values()], feeds, threads=threads, rounds=rounds)
        medians = [float(np.median(t)) for t in times]
        result[label] = {"original_ms": medians[0],
                         **{f"{name}_speedup": medians[0] / m for name, m in zip(models, medians[1:])}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib")
    parser.add_argument("--eval")
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--keep", type=Path, required=True, help="folder to save every model in")
    parser.add_argument("--with-3d", action="store_true", help="also the latency plan of --method asym3d")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    original = onnx.load(args.model)
    source = open_calibration(args.eval or args.calib, model_inputs(original))
    sample = source.get([0])
    common = dict(calibration=args.calib, evaluation=args.eval, num_images=args.num_images, threads=1,
                  latency_cache=args.keep / "latency-cache.json")
    plans = {"flops": dict(objective="flops"), "latency": dict(objective="latency")}
    if args.with_3d:
        plans["latency_3d"] = dict(objective="latency", method="asym3d")
    rows = []
    for speedup in args.speedups:
        row = {"speedup": speedup, "grid": rank_grid("cpu")[1], "plans": {}}
        models = {}
        for name, plan in plans.items():
            clock = time.perf_counter()
            try:
                result = compress(original, speedup, bench=False, **plan, **common)
            except InfeasibleTargetError as exc:  # e.g. a measured 4x no plan on this CPU reaches
                row["plans"][name] = {"infeasible": str(exc)}
                continue
            models[name] = result.model
            report = result.report
            row["plans"][name] = {"theoretical_speedup": report.theoretical_speedup,
                                  "output_rel_error": next(iter(report.fidelity.output_rel_error.values())),
                                  "top1_agreement": report.fidelity.top1_agreement,
                                  "seconds": time.perf_counter() - clock,
                                  "predicted_ms": (report.latency_plan or {}).get("predicted_ms"),
                                  "in_model": (report.latency_plan or {}).get("in_model")}
        quantized = compress(original, speedup, quantize="int8", bench=False, **common)
        row["stages"] = [{k: v for k, v in s.items() if k != "latency_ms"} for s in quantized.report.stages]
        models["lowrank_int8"] = quantized.model
        calib = open_calibration(args.calib, model_inputs(original))  # the same samples the tool quantized with
        with Int8Quantizer(original, SourceReader(calib, list(range(min(len(calib), 128))), 8)) as quantizer:
            models["int8"] = quantizer.quantize()
        for name, model in models.items():
            onnx.save(model, args.keep / f"{args.model.stem}-{speedup:g}-{name}.onnx")
        row["measured"] = timings(original, models, sample, args.rounds)
        planned = [name for name in models if name in plans]
        times = linear_op_times([original, *(models[name] for name in planned)], sample, Device(threads=1),
                                rounds=args.rounds)
        row["conv_time_speedup_1_thread"] = {name: float(np.median(times[0] / t)) for name, t in zip(planned, times[1:])}
        row["original_conv_ms_1_thread"] = float(np.median(times[0]))
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
