"""Issue 13: decomposing every kind of linear layer vs convs only, on one model.

For each speedup and each ``--ops`` set, one run of the library (``onnx_lowrank.compress``): the
planned speedup (over the compute of the kinds decomposed, per kind, and over every linear layer),
fidelity on the evaluation set, and the whole-model latency original vs optimized measured by the
run itself (interleaved, medians, on ``--threads``). With ``--decode ctc`` (a text recognizer with
a CTC head, blank = class 0) also the share of evaluation lines read identically by both models.

    python tools/bench_kinds.py /tmp/models/.../ch_PP-OCRv4_rec_infer.onnx --calib /tmp/lines-calib.npz \\
        --eval /tmp/lines-eval.npz --decode ctc --out benchmarks/issue13/ppocr-rec.json
    python tools/bench_kinds.py /tmp/vgg16-112.onnx --ops conv conv,dense --method linear --out ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnx_lowrank import compress
from onnx_lowrank.errors import LowRankError
from onnx_lowrank.measure.fidelity import model_outputs


def ctc_greedy(scores: np.ndarray) -> list[tuple[int, ...]]:
    """Best-path decoding: argmax per step, repeats collapsed, blanks (0) dropped."""
    lines = []
    for path in scores.argmax(-1):
        kept = [int(c) for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        lines.append(tuple(kept))
    return lines


def run(model: str, speedup: float, ops: str, args) -> dict:
    clock = time.perf_counter()
    row = {"speedup": speedup, "ops": ops}
    try:
        result = compress(model, speedup, calibration=args.calib, evaluation=args.eval, ops=ops.split(","),
                          method=args.method, rank_selection=args.rank_selection, skip=args.skip, threads=args.threads, bench_rounds=args.rounds,
                          num_images=args.num_images, holdout=args.holdout, rank_multiple=args.rank_multiple)
    except LowRankError as exc:
        return {**row, "error": str(exc), "seconds": time.perf_counter() - clock}
    report = result.report
    row.update(seconds=time.perf_counter() - clock, theoretical=report.theoretical_speedup,
               theoretical_by_kind=report.theoretical_speedup_by_kind,
               theoretical_model=report.theoretical_model_speedup,
               decomposed={op: sum(1 for layer in report.layers if layer.op == op and layer.flops_after < layer.flops_before)
                           for op in sorted({layer.op for layer in report.layers})},
               output_rel_error=report.fidelity.output_rel_error, top1_agreement=report.fidelity.top1_agreement,
               samples=report.fidelity.samples, measured=report.actual_speedup.get("cpu"),
               latency_ms=report.latency_ms.get("cpu"), warnings=report.warnings)
    if args.decode == "ctc":
        from onnx_lowrank.runtime.calibration import model_inputs, open_calibration

        source = open_calibration(args.eval, model_inputs(result.model), role="evaluation")
        indices = list(range(len(source)))
        original = model_outputs(Path(model), source, indices, 8, args.threads)
        optimized = model_outputs(result.model, source, indices, 8, args.threads)
        reference, candidate = ctc_greedy(next(iter(original.values()))), ctc_greedy(next(iter(optimized.values())))
        row["lines_read_identically"] = float(np.mean([a == b for a, b in zip(reference, candidate)]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", default=None, help="calibration data (.npz, folder; none: random inputs)")
    parser.add_argument("--eval", default=None, help="evaluation data, disjoint from the calibration data")
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--ops", nargs="+", default=["conv", "conv,transpose,dense"])
    parser.add_argument("--method", default="asymmetric")
    parser.add_argument("--rank-selection", default=None, choices=["energy", "sensitivity", "uniform"])
    parser.add_argument("--skip", nargs="*", default=[], help="layer names to leave alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--rank-multiple", type=int, default=16)
    parser.add_argument("--decode", choices=["ctc"], default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for speedup in args.speedups:
        for ops in args.ops:
            rows.append(run(args.model, speedup, ops, args))
            print(json.dumps(rows[-1], default=float), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "method": args.method, "threads": args.threads,
                                    "rank_selection": args.rank_selection, "skip": args.skip,
                                    "rows": rows}, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
