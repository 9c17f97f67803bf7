"""Rank selection compared at the same targets: energy (Eq. 13-14) vs measured sensitivity, for
each method, with fidelity on a test set the tool sees as --eval only; optionally each plan once
more with an empirical bias correction after the solve (PTQ-style, see ``bias_corrected``).

The analysis (responses) and the sensitivity table are computed once through the library and
shared by every (method, speedup, selection), as they would be by separate runs with the same data.

    python tools/bench_selection.py models/digits-vgg.onnx --calib models/digits-calib.npz \\
        --eval models/digits-test.npz --speedups 2 3 4 --methods asymmetric asym3d \\
        --bias-correction --json benchmarks/issue11/demo-selection.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank.errors import InfeasibleTargetError
from onnx_lowrank.graph.surgery import prefix_model
from onnx_lowrank.measure.sensitivity import measure_sensitivity
from onnx_lowrank.options import Options
from onnx_lowrank.pipeline import compress as api
from onnx_lowrank.runtime.images import make_preprocess
from onnx_lowrank.runtime.sessions import collect_responses

WHOLE_CONV_POSITIONS = 64  # positions per image sampled for convs the plan leaves whole


def bias_corrected(analysis: api.Analysis, optimized: onnx.ModelProto, decomposed: set[str]) -> onnx.ModelProto:
    """Empirical bias correction (as AIMET's for quantization): shallow to deep, every conv after
    the first decomposed one gets its bias shifted so that its mean pre-activation response on the
    calibration samples equals the original network's, with the layers before it already corrected.
    Means are compared at the same sampled positions of the same images."""
    model = onnx.ModelProto()
    model.CopyFrom(optimized)
    order = [u for u in analysis.units]
    first = next(i for i, u in enumerate(order) if u.name in decomposed)
    tensors = [u.output for u in order[first:]]
    collect = dict(analysis.collect)
    positions = {t: WHOLE_CONV_POSITIONS for t in tensors} | dict(collect.pop("samples_per_image"))
    reference = collect_responses(analysis.normalised, tensors=tensors, samples_per_image=positions, **collect)
    targets = {t: reference[t].mean(axis=0, dtype=np.float64) for t in tensors}
    del reference
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for tensor in tensors:
        current = collect_responses(prefix_model(model, [tensor]), tensors=[tensor], samples_per_image=positions,
                                    **collect)[tensor].mean(axis=0, dtype=np.float64)
        node = producers[tensor]
        shift = (targets[tensor] - current).astype(np.float32)
        if len(node.input) > 2 and node.input[2]:
            bias = initializers[node.input[2]]
            bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + shift, bias.name))
        else:
            name = f"{node.name}_corrected_bias"
            model.graph.initializer.append(numpy_helper.from_array(shift, name))
            initializers[name] = model.graph.initializer[-1]
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(name) if len(node.input) == 2 else node.input.__setitem__(2, name)
    return model


def error_of(report) -> float:
    return float(next(iter(report.fidelity.output_rel_error.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--methods", nargs="+", default=["asymmetric", "asym3d"])
    parser.add_argument("--selections", nargs="+", default=["energy", "sensitivity"])
    parser.add_argument("--bias-correction", action="store_true", help="also measure each plan bias-corrected")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--input-size", help="HxW")
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--scale", type=float)
    parser.add_argument("--mean")
    parser.add_argument("--std")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    preprocess = None
    if not args.calib.endswith((".npz", ".npy")):
        def floats(text):
            return tuple(float(v) for v in text.split(",")) if text else None
        preprocess = make_preprocess(args.preprocess, floats(args.mean), floats(args.std), args.scale)
    size = tuple(int(v) for v in args.input_size.split("x")) if args.input_size else None
    base = Options(speedup=args.speedups[0], num_images=args.num_images, bench=False, input_size=size)
    clock = time.perf_counter()
    analysis = api.analyse(args.model, base, args.calib, args.eval, preprocess)
    analysis_s = time.perf_counter() - clock
    clock = time.perf_counter()
    sensitivity = measure_sensitivity(analysis, base) if "sensitivity" in args.selections else None
    sensitivity_s = time.perf_counter() - clock
    analysis.sensitivity = sensitivity
    print(json.dumps({"analysis_s": analysis_s, "sensitivity_s": sensitivity_s}), flush=True)

    rows = []
    for method in args.methods:
        for speedup in args.speedups:
            for selection in args.selections:
                opts = dataclasses.replace(base, method=method, speedup=speedup, rank_selection=selection)
                clock = time.perf_counter()
                try:
                    plan = api.plan_for(analysis, opts)
                except InfeasibleTargetError as exc:
                    rows.append({"method": method, "speedup": speedup, "selection": selection, "infeasible": str(exc)})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                solved = api.solve(analysis, plan, opts, cache={})
                optimized = api.rewrite(analysis, solved)
                report = api.report_for(analysis, plan, solved, opts)
                api.measure(analysis, optimized, report, opts)
                row = {"method": method, "speedup": speedup, "selection": selection,
                       "theoretical_speedup": plan.speedup, "output_rel_error": error_of(report),
                       "top1_agreement": report.fidelity.top1_agreement,
                       "accuracy": [report.fidelity.accuracy_original, report.fidelity.accuracy_optimized],
                       "n": report.fidelity.samples, "solve_s": time.perf_counter() - clock,
                       "ranks": dict(plan.ranks)}
                if args.bias_correction and selection == "energy":
                    clock = time.perf_counter()
                    corrected = bias_corrected(analysis, optimized, set(plan.layers))
                    api.measure(analysis, corrected, report, opts)
                    row |= {"bias_corrected_error": error_of(report),
                            "bias_corrected_top1_agreement": report.fidelity.top1_agreement,
                            "bias_corrected_accuracy": report.fidelity.accuracy_optimized,
                            "bias_correction_s": time.perf_counter() - clock}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"analysis_s": analysis_s, "sensitivity_s": sensitivity_s,
                                                 "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
