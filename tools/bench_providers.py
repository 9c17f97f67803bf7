"""Time saved models against their original on one execution provider, interleaved (medians),
with nothing but onnxruntime and NumPy: run it in the venv that has the provider's package
(onnxruntime-openvino, onnxruntime-gpu), which replaces onnxruntime there.

    /tmp/ovenv/bin/python tools/bench_providers.py --provider openvino --original models/digits-vgg.onnx \\
        /tmp/lat-demo/digits-vgg-*.onnx --json benchmarks/issue12/demo-openvino.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider",
             "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session(path: Path, provider: str) -> ort.InferenceSession:
    made = ort.InferenceSession(str(path), providers=[PROVIDERS[provider]])
    if made.get_providers()[0] != PROVIDERS[provider]:  # never a CPU figure under another provider's name
        raise SystemExit(f"{provider} did not start for {path}: {made.get_providers()}")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--original", type=Path, required=True)
    parser.add_argument("--provider", default="openvino", choices=sorted(PROVIDERS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for path in args.models:
        sessions = [session(args.original, args.provider), session(path, args.provider)]
        spec = sessions[0].get_inputs()[0]
        for batch in args.batch:
            shape = [batch if not isinstance(d, int) else d for d in spec.shape]
            feeds = {spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            for s in sessions:
                for _ in range(5):
                    s.run(None, feeds)
            times = [[], []]
            for round_index in range(args.rounds):
                for offset in range(2):
                    which = (round_index + offset) % 2
                    start = time.perf_counter()
                    sessions[which].run(None, feeds)
                    times[which].append((time.perf_counter() - start) * 1e3)
            medians = [float(np.median(t)) for t in times]
            rows.append({"model": path.name, "provider": args.provider, "batch": batch, "original_ms": medians[0],
                         "optimized_ms": medians[1], "speedup": medians[0] / medians[1],
                         "p90_ms": [float(np.percentile(t, 90)) for t in times], "onnxruntime": ort.__version__})
            print(json.dumps(rows[-1]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
