"""3d decomposition vs channel-only vs the data-free baselines (paper §3.5, Fig. 6, Tables 3/7/8).

Two steps, so the timing can run on a quiet machine after the (long) solving:

    build  for each target speedup and method, compress the model (same calibration, evaluation
           and seed for all), write it under --out and record fidelity, theoretical speedups and
           the chosen ranks;
    time   for each built model, onnxruntime CPU latency of original vs optimized, timed
           interleaved in one process (medians), at batch 1 with 1 thread, batch 1 with the default
           threads, and batch 8 with the default threads; with the actual/theoretical ratio.

    python tools/bench_3d.py build demo models/digits-vgg.onnx --calib models/digits-calib.npz \\
        --eval models/digits-test.npz --out /tmp/b3d --json benchmarks/issue4/demo.json
    python tools/bench_3d.py build craft /tmp/craft.onnx --calib /tmp/text-calib --eval-images /tmp/text-eval \\
        --eval-images /tmp/textimgs --kind craft --num-images 48 --samples-per-image 64 --out /tmp/b3d \\
        --json benchmarks/issue4/craft.json
    python tools/bench_3d.py time benchmarks/issue4/demo.json --rounds 30
    python tools/bench_3d.py time benchmarks/issue4/craft.json --rounds 10
    python tools/bench_3d.py render benchmarks/issue4/demo.json benchmarks/issue4/craft.json

The JSON is rewritten after every model, so a cut-short run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paper import score_map_fidelity, top1_agreement  # noqa: E402

METHODS = ("asym3d", "asymmetric", "jaderberg", "svd", "tucker2")
SETTINGS = {"b1_t1": (1, 1), "b1_default": (1, 0), "b8_default": (8, 0)}  # batch, intra-op threads


def build(args) -> None:
    from onnx_lowrank import compress
    from onnx_lowrank.errors import InfeasibleTargetError
    from onnx_lowrank.runtime.calibration import model_inputs, open_calibration
    from onnx_lowrank.runtime.images import make_preprocess

    preprocess = make_preprocess(args.preset, None, None, None, None)
    original = onnx.load(args.model)
    inputs = model_inputs(original)
    eval_feeds = []
    for folder in args.eval_images:
        source = open_calibration(folder, inputs, preprocess=preprocess)
        eval_feeds += [source.get([i]) for i in range(len(source))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"name": args.name, "model": args.model, "command": "python " + " ".join(sys.argv), "rows": []}
    for speedup in args.speedups:
        for method in args.methods:
            label = method + (f" ({args.rank_selection} ranks)" if args.rank_selection else "")
            row = {"speedup": speedup, "method": label}
            start = time.perf_counter()
            try:
                result = compress(args.model, speedup, calibration=args.calib, evaluation=args.eval,
                                  preprocess=preprocess, method=method, num_images=args.num_images,
                                  samples_per_image=args.samples_per_image, bench=False,
                                  rank_selection=args.rank_selection)
            except InfeasibleTargetError as exc:
                row["infeasible"] = str(exc)
            else:
                report = result.report
                path = out / f"{args.name}-{method}-{args.rank_selection or 'default'}-{speedup:g}x.onnx"
                onnx.save(result.model, path)
                row.update(path=str(path), run_s=time.perf_counter() - start,
                           theoretical_speedup=report.theoretical_speedup,
                           theoretical_model_speedup=report.theoretical_model_speedup,
                           channel_speedup=report.channel_speedup,
                           output_rel_error=list(report.fidelity.output_rel_error.values())[0],
                           top1_agreement=report.fidelity.top1_agreement,
                           top5_overlap=report.fidelity.top5_overlap,
                           accuracy=[report.fidelity.accuracy_original, report.fidelity.accuracy_optimized],
                           layers=[{"name": layer.name, "kernel": layer.kernel,
                                    "shape": f"{layer.in_channels}->{layer.out_channels}", "rank": layer.rank,
                                    "spatial_rank": layer.spatial_rank, "input_rank": layer.input_rank,
                                    "note": layer.note or layer.skipped_reason} for layer in report.layers])
                if eval_feeds and args.kind == "craft":
                    row.update(score_map_fidelity(original, result.model, eval_feeds))
                elif eval_feeds:
                    row["eval_top1_agreement"] = top1_agreement(original, result.model, eval_feeds)
            data["rows"].append(row)
            Path(args.json).write_text(json.dumps(data, indent=1))
            print(json.dumps({k: row.get(k) for k in ("speedup", "method", "run_s", "output_rel_error",
                                                      "text_iou", "infeasible")}), flush=True)


def time_models(args) -> None:
    from onnx_lowrank.measure.fidelity import measure_latency
    from onnx_lowrank.runtime.calibration import model_inputs

    data = json.loads(Path(args.json).read_text())
    original = onnx.load(data["model"]).SerializeToString()
    spec = model_inputs(onnx.load(data["model"]))[0]
    rng = np.random.default_rng(0)
    data["timing_command"] = "python " + " ".join(sys.argv)
    for row in data["rows"]:
        if "path" not in row:
            continue
        optimized = Path(row["path"]).read_bytes()
        row["latency_ms"] = {}
        for setting, (batch, threads) in SETTINGS.items():
            shape = [batch] + [d if d is not None else 1 for d in spec.shape[1:]]
            feeds = {spec.name: rng.standard_normal(shape).astype(np.float32)}
            latency = measure_latency(original, optimized, feeds, threads=threads, rounds=args.rounds)
            row["latency_ms"][setting] = {"original": latency.original_ms, "optimized": latency.optimized_ms,
                                          "speedup": latency.speedup,
                                          "actual_over_theoretical": latency.speedup / row["theoretical_speedup"]}
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(row["speedup"], row["method"], {s: round(v["speedup"], 2) for s, v in row["latency_ms"].items()},
              flush=True)


def render(paths: list[str]) -> None:
    """Markdown tables of the measurements (what BENCHMARKS.md shows)."""
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        craft = any("text_iou" in row for row in rows)
        print(f"\n#### {data['name']}\n\nBuilt with `{data['command']}`; timed with `{data.get('timing_command')}`.\n")
        print("| target | method | theor. conv | output err | " + ("text IoU" if craft else "accuracy (orig 98.9 %)")
              + " | b1 1 thread: ms orig → opt, speedup (actual/theor.) | b1 default threads | b8 default threads "
              "| CUDA |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            if "infeasible" in row:
                print(f"| {row['speedup']:g}× | {row['method']} | infeasible: {row['infeasible']} | | | | | | |")
                continue
            quality = (f"{100 * row['text_iou']:.1f} %" if craft else f"{100 * row['accuracy'][1]:.1f} %")
            cells = []
            for setting in SETTINGS:
                timing = row.get("latency_ms", {}).get(setting)
                if timing is None:
                    cells.append("not timed")
                    continue
                ms = f"{timing['original']:.1f} → {timing['optimized']:.1f} ms, " if setting == "b1_t1" else ""
                cells.append(f"{ms}{timing['speedup']:.2f}× ({timing['actual_over_theoretical']:.2f})")
            print(f"| {row['speedup']:g}× | {row['method']} | {row['theoretical_speedup']:.2f}× | "
                  f"{row['output_rel_error']:.3f} | {quality} | " + " | ".join(cells) + " | not available |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    make = steps.add_parser("build")
    make.add_argument("name")
    make.add_argument("model")
    make.add_argument("--calib", required=True)
    make.add_argument("--eval", help="labelled .npz for accuracy")
    make.add_argument("--eval-images", action="append", default=[], help="image folder(s) for CRAFT's checks")
    make.add_argument("--kind", choices=("classifier", "craft"), default="classifier")
    make.add_argument("--preset", default="imagenet")
    make.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    make.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    make.add_argument("--rank-selection", choices=("energy", "uniform"), help="default: each method's own")
    make.add_argument("--num-images", type=int, default=300)
    make.add_argument("--samples-per-image", type=int, default=32)
    make.add_argument("--out", required=True, help="folder for the built models")
    make.add_argument("--json", required=True)
    timing = steps.add_parser("time")
    timing.add_argument("json")
    timing.add_argument("--rounds", type=int, default=30)
    show = steps.add_parser("render")
    show.add_argument("json", nargs="+")
    args = parser.parse_args()
    if args.step == "build":
        build(args)
    elif args.step == "time":
        time_models(args)
    else:
        render(args.json)


if __name__ == "__main__":
    main()
