"""Reproduce the paper's comparisons (Fig. 4, Fig. 5, Tables 2/6) on one model; prints Markdown.

For each target speedup, four configurations of the same pipeline, same calibration and
evaluation images (disjoint), same seed:

    linear      PCA (Eq. 4), uniform ranks           -> Fig. 4 baseline
    nonlinear   Eq. 6, symmetric, uniform ranks      -> Fig. 4 / Fig. 5 baseline
    asymmetric  Eq. 6 + Eq. 12, uniform ranks        -> Fig. 5
    selection   Eq. 6 + Eq. 12, energy ranks (Eq. 13-14, the default) -> Tables 2 / 6

1. single layer: each layer's response error after its activation, solved from the original
   input (``linear`` vs ``nonlinear``: both symmetric, so every layer is a single-layer problem);
2. the first three decomposed layers of the finished model: error of their (post-activation)
   responses against the original network on the evaluation images, symmetric vs asymmetric;
3. whole model: uniform vs selection, output error and the ranks chosen;
4. fidelity (accuracy / top-1 agreement / score-map error and text-mask IoU) and latency
   (onnxruntime CPU, batch 1, default threads, original and optimized interleaved; medians).

    python tools/bench_paper.py demo   models/digits-vgg.onnx --calib models/digits-calib.npz --eval models/digits-test.npz
    python tools/bench_paper.py lite0  /tmp/lite0.onnx --calib /tmp/photos/calib --eval-images /tmp/photos/eval \\
        --preset raw --mean 127 --std 128
    python tools/bench_paper.py craft  /tmp/craft.onnx --calib /tmp/photos/calib --eval-images /tmp/photos/eval \\
        --eval-images /tmp/ocvdoc/usr/share/doc/opencv-doc/examples/text --kind craft
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

CONFIGS = {
    "linear": dict(method="linear", rank_selection="uniform"),
    "nonlinear": dict(method="nonlinear", rank_selection="uniform"),
    "asymmetric": dict(method="asymmetric", rank_selection="uniform"),
    "selection": dict(method="asymmetric", rank_selection="energy"),
}
TEXT_THRESHOLD = 0.4  # CRAFT's low_text: pixels of the region score map counted as text


def response_errors(original, optimized, names, acts, feeds_list) -> dict[str, float]:
    """Post-activation relative error of the responses ``names``, optimized vs original network."""
    from onnx_lowrank.runtime.sessions import make_session, with_outputs
    from onnx_lowrank.solvers.activations import apply_activation

    sessions = [make_session(with_outputs(m, names), optimize=False) for m in (original, optimized)]
    error, spread = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for feeds in feeds_list:
        ref, approx = (dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for s in sessions)
        for name in names:
            kind, params = acts[name]
            r, a = apply_activation(kind, params, ref[name]), apply_activation(kind, params, approx[name])
            error[name] += float(np.sum((r - a) ** 2))
            spread[name] += float(np.sum((r - r.mean(axis=(0, 2, 3), keepdims=True)) ** 2))
    return {n: float(np.sqrt(error[n] / spread[n])) for n in names}


def score_map_fidelity(original, optimized, feeds_list) -> dict:
    """CRAFT: relative error of the score maps and IoU of the thresholded region (text) masks."""
    from onnx_lowrank.runtime.sessions import make_session

    sessions = [make_session(m) for m in (original, optimized)]
    err = ref_norm = inter = union = 0.0
    for feeds in feeds_list:
        ref, approx = (s.run(None, feeds)[0] for s in sessions)
        err += float(np.sum((ref - approx) ** 2))
        ref_norm += float(np.sum(ref ** 2))
        mask_ref, mask_opt = ref[:, 0] > TEXT_THRESHOLD, approx[:, 0] > TEXT_THRESHOLD
        inter += float(np.sum(mask_ref & mask_opt))
        union += float(np.sum(mask_ref | mask_opt))
    return {"score_rel_error": float(np.sqrt(err / ref_norm)), "text_iou": inter / union if union else None,
            "text_pixels": union}


def run(args, save) -> list[dict]:
    from onnx_lowrank import compress
    from onnx_lowrank.errors import InfeasibleTargetError
    from onnx_lowrank.graph.normalise import normalise
    from onnx_lowrank.graph.units import find_units
    from onnx_lowrank.runtime.calibration import model_inputs, open_calibration
    from onnx_lowrank.runtime.images import make_preprocess

    preprocess = make_preprocess(args.preset, [args.mean] * 3 if args.mean is not None else None,
                                 [args.std] * 3 if args.std is not None else None,
                                 1.0 if args.preset == "raw" else None, None)
    original = onnx.load(args.model)
    units = {u.name: u for u in find_units(normalise(original))}
    inputs = model_inputs(original)
    eval_feeds = []
    if args.eval:
        labelled = open_calibration(args.eval, inputs)
        eval_feeds = [labelled.get(list(range(start, min(start + 50, len(labelled)))))
                      for start in range(0, min(len(labelled), 500), 50)]
    if args.eval_images:
        for folder in args.eval_images:
            source = open_calibration(folder, inputs, preprocess=preprocess)
            eval_feeds += [source.get([i]) for i in range(len(source))]
    rows = []
    for speedup in args.speedups:
        for config, options in CONFIGS.items():
            start = time.perf_counter()
            try:
                result = compress(args.model, speedup, calibration=args.calib, evaluation=args.eval,
                                  preprocess=preprocess, num_images=args.num_images,
                                  samples_per_image=args.samples_per_image, bench_rounds=args.rounds, **options)
            except InfeasibleTargetError as exc:
                rows.append({"speedup": speedup, "config": config, "infeasible": str(exc)})
                save(rows)
                print(json.dumps(rows[-1]), flush=True)
                continue
            elapsed = time.perf_counter() - start
            report = result.report
            decomposed = [layer for layer in report.layers if layer.rank is not None]
            first3 = [units[layer.name] for layer in decomposed[:3]]
            row = {
                "speedup": speedup, "config": config, "run_s": elapsed,
                "theoretical_speedup": report.theoretical_speedup,
                "latency_ms": report.latency_ms.get("cpu"), "measured_speedup": report.actual_speedup.get("cpu"),
                "output_rel_error": list(report.fidelity.output_rel_error.values())[0],
                "top1_agreement": report.fidelity.top1_agreement,
                "accuracy": [report.fidelity.accuracy_original, report.fidelity.accuracy_optimized],
                "layers": [{"name": layer.name, "shape": f"{layer.in_channels}->{layer.out_channels} "
                            f"{'x'.join(map(str, layer.kernel))}", "rank": layer.rank, "energy": layer.energy,
                            "response_error": layer.response_error} for layer in report.layers],
                "asymmetric_passes": report.asymmetric_collection_passes,
                "timings_s": report.timings_s,
            }
            if eval_feeds:
                row["first_layers_error"] = response_errors(
                    normalise(original), result.model, [u.output for u in first3],
                    {u.output: (u.activation.kind, u.activation.params) for u in first3}, eval_feeds)
                row["first_layers"] = [u.name for u in first3]
                if args.kind == "craft":
                    row.update(score_map_fidelity(original, result.model, eval_feeds))
                elif args.kind == "classifier":
                    row["eval_top1_agreement"] = top1_agreement(original, result.model, eval_feeds)
            rows.append(row)
            save(rows)
            print(json.dumps({k: row[k] for k in ("speedup", "config", "run_s", "output_rel_error",
                                                  "measured_speedup")}), flush=True)
    return rows


def top1_agreement(original, optimized, feeds_list) -> float:
    from onnx_lowrank.runtime.sessions import make_session

    sessions = [make_session(m) for m in (original, optimized)]
    same = [int(np.argmax(sessions[0].run(None, f)[0]) == np.argmax(sessions[1].run(None, f)[0])) for f in feeds_list]
    return float(np.mean(same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", help="labelled .npz for accuracy")
    parser.add_argument("--eval-images", action="append", default=[], help="image folder(s) for the fidelity checks")
    parser.add_argument("--kind", choices=("classifier", "craft"), default="classifier")
    parser.add_argument("--preset", default="imagenet")
    parser.add_argument("--mean", type=float)
    parser.add_argument("--std", type=float)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--samples-per-image", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", required=True, help="where to write the measurements")
    args = parser.parse_args()
    def save(rows: list[dict]) -> None:  # after every configuration, so a cut-short run keeps its rows
        Path(args.json).write_text(json.dumps({"name": args.name, "command": vars(args), "rows": rows}, indent=1))

    run(args, save)


if __name__ == "__main__":
    main()
