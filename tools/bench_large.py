"""A model over protobuf's 2 GiB limit, end to end: build a synthetic VGG-style net with very wide
7x7 layers (weights saved as external data), run the command on it, and report wall time and the
peak RSS of the run next to the model's size.

    python tools/bench_large.py out/large --channels 1536 --layers 8 --speedup 1.25

The weights are random (He-initialised) and the calibration inputs random normal: the point is the
path (sessions from files with external data, the output written as a model + data pair) and its
memory, not the fidelity.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(channels: int, layers: int, kernel: int, size: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x, c = [], [], "image", 3
    for index in range(layers):
        weight = (rng.standard_normal((channels, c, kernel, kernel), dtype=np.float32)
                  * np.float32(np.sqrt(2.0 / (kernel * kernel * c))))
        inits += [numpy_helper.from_array(weight, f"conv{index}.weight"),
                  numpy_helper.from_array(np.zeros(channels, np.float32), f"conv{index}.bias")]
        nodes += [helper.make_node("Conv", [x, f"conv{index}.weight", f"conv{index}.bias"], [f"conv{index}"],
                                   name=f"conv{index}", kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4),
                  helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"], name=f"relu{index}")]
        x, c = f"relu{index}", channels
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"])]
    inits.append(numpy_helper.from_array(rng.standard_normal((c, 100), dtype=np.float32) / np.float32(np.sqrt(c)),
                                         "fc.weight"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.weight"], ["logits"], name="fc"))
    graph = helper.make_graph(nodes, "wide-vgg", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                 ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 100])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--speedup", type=float, default=1.25)
    parser.add_argument("--method", default="asymmetric")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    model_path = args.folder / "wide.onnx"
    if not model_path.exists():
        onnx.save(build(args.channels, args.layers, args.kernel, args.size), str(model_path),
                  save_as_external_data=True, location="wide.onnx.data")
    calib = args.folder / "calib.npy"
    np.save(calib, np.random.default_rng(1).standard_normal((args.images, 3, args.size, args.size)).astype(np.float32))
    model_bytes = sum(p.stat().st_size for p in args.folder.glob("wide.onnx*"))
    out = args.folder / "out" / "wide-lowrank.onnx"
    report = args.folder / "out" / "report.json"
    command = [sys.executable, "-m", "onnx_lowrank", str(model_path), str(out), "--speedup", str(args.speedup),
               "--calib", str(calib), "--method", args.method, "--samples-per-image", str(args.size ** 2),
               "--report", str(report)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    data = json.loads(report.read_text())
    written = sum(p.stat().st_size for p in out.parent.glob("wide-lowrank.onnx*"))
    result = {"command": " ".join(command), "model_bytes": model_bytes, "output_bytes": written,
              "wall_s": round(wall, 1), "peak_rss_bytes": peak, "peak_rss_over_model": round(peak / model_bytes, 2),
              "timings_s": {k: round(v, 1) for k, v in data["timings_s"].items()},
              "theoretical_speedup": data["theoretical_speedup"], "actual_speedup": data["actual_speedup"],
              "output_files": data["files"]["output"]}
    (args.folder / "bench_large.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
