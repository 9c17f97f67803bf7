"""Measure the end-to-end tool: run time, peak memory, theoretical vs measured speedup, fidelity.

Each configuration runs in a fresh child process (so peak RSS is its own). Latency is measured
with onnxruntime, original and optimized interleaved in one process after warm-up, batch 1, with
1 thread and with onnxruntime's default thread count; medians of >= 30 rounds.

    python tools/vgg16.py /tmp/vgg16.onnx
    python tools/photos.py /tmp/photos --opencv-doc /tmp/opencv-doc
    python tools/bench_pipeline.py --vgg16 /tmp/vgg16.onnx --photos /tmp/photos > /tmp/bench.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(model: str, speedup: float, calib: str, evaluation: str | None, num_images: int,
            preset: str, rounds: int) -> dict:
    from onnx_lowrank import compress
    from onnx_lowrank.measure.fidelity import measure_latency
    from onnx_lowrank.runtime.calibration import model_inputs, open_calibration
    from onnx_lowrank.runtime.images import make_preprocess

    start = time.perf_counter()
    result = compress(model, speedup, calibration=calib, evaluation=evaluation, num_images=num_images,
                      preprocess=make_preprocess(preset), bench=False)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import onnx

    original = onnx.load(model)
    source = open_calibration(evaluation or calib, model_inputs(original), preprocess=make_preprocess(preset))
    feeds = source.get([0])
    latency = {}
    for threads in (1, 0):
        measured = measure_latency(original, result.model, feeds, threads=threads, rounds=rounds)
        latency["1 thread" if threads == 1 else "default threads"] = {
            "original_ms": measured.original_ms, "optimized_ms": measured.optimized_ms, "speedup": measured.speedup}
    report = result.report
    fidelity = report.fidelity
    return {
        "model": Path(model).name, "speedup_target": speedup, "run_s": elapsed, "peak_rss_mb": peak_mb,
        "timings_s": report.timings_s, "calibration_samples": report.calibration_samples,
        "theoretical_speedup": report.theoretical_speedup,
        "theoretical_model_speedup": report.theoretical_model_speedup, "latency": latency,
        "top1_agreement": fidelity.top1_agreement, "output_rel_error": list(fidelity.output_rel_error.values())[0],
        "accuracy_original": fidelity.accuracy_original, "accuracy_optimized": fidelity.accuracy_optimized,
        "ranks": {layer.name: layer.rank for layer in report.layers},
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | target | theor. conv | theor. model | 1 thread: orig → opt ms (speedup, actual/theor.) "
             "| default threads: orig → opt ms (speedup, actual/theor.) | top-1 agree | accuracy orig → opt "
             "| out rel. err | run time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for key in ("1 thread", "default threads"):
            lat = r["latency"][key]
            cells.append(f"{lat['original_ms']:.2f} → {lat['optimized_ms']:.2f} ({lat['speedup']:.2f}×, "
                         f"{lat['speedup'] / r['theoretical_model_speedup']:.2f})")
        accuracy = ("-" if r["accuracy_original"] is None else
                    f"{100 * r['accuracy_original']:.1f}% → {100 * r['accuracy_optimized']:.1f}%")
        lines.append(f"| {r['model']} | {r['speedup_target']:g}× | {r['theoretical_speedup']:.2f}× | "
                     f"{r['theoretical_model_speedup']:.2f}× | {cells[0]} | {cells[1]} | "
                     f"{100 * r['top1_agreement']:.1f}% | {accuracy} | {r['output_rel_error']:.3f} | "
                     f"{r['run_s']:.0f} s | {r['peak_rss_mb'] / 1024:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vgg16", help="VGG-16 ONNX from tools/vgg16.py")
    parser.add_argument("--photos", help="folder from tools/photos.py (calib/ and eval/)")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    configs = [dict(model=str(ROOT / "models/digits-vgg.onnx"), speedup=s, calib=str(ROOT / "models/digits-calib.npz"),
                    evaluation=str(ROOT / "models/digits-test.npz"), num_images=300, preset="raw", rounds=60)
               for s in (2, 3, 4)]
    if args.vgg16 and args.photos:
        configs += [dict(model=args.vgg16, speedup=s, calib=f"{args.photos}/calib", evaluation=f"{args.photos}/eval",
                         num_images=300, preset="imagenet", rounds=20) for s in (2, 4)]
    rows = []
    for config in configs:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {rows[-1]['model']} {config['speedup']}x in {rows[-1]['run_s']:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
