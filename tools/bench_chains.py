"""What onnxruntime does with the chains each method writes, one layer at a time.

For one k x k conv (c -> d at H x W) and a target speedup r, builds the single-layer chains
(channel: k x k -> 1 x 1; 3d: k x 1 -> 1 x k -> 1 x 1 with sqrt(r) per part; spatial: k x 1 -> 1 x k),
with ranks rounded to 16 and the same ranks off the 16-grid, and reports for each:

* the nodes onnxruntime's CPU graph optimiser turns the chain into (NCHWc convs, reorders);
* its latency against the original conv, timed interleaved in one process (medians), at batch 1
  and 8 with 1 and 2 threads, and the ratio of measured to theoretical (exact MACs) speedup;
* per node, the kernel time from onnxruntime's profiler and the GMAC/s it reaches.

    python tools/bench_chains.py --json benchmarks/issue4/chains.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LAYERS = [(128, 128, 56), (256, 256, 28), (512, 512, 14)]  # (c, d, H = W), VGG-16 conv2/3/4-like
SETTINGS = [(1, 1), (1, 2), (8, 1), (8, 2)]  # (batch, threads)


def chain_model(c: int, h: int, convs: list[tuple[int, tuple[int, int]]]) -> onnx.ModelProto:
    """Convs applied in turn: (out_channels, (kh, kw)), 'same' padding, random weights."""
    rng = np.random.default_rng(0)
    nodes, inits, current, channels = [], [], "x", c
    for index, (out, (kh, kw)) in enumerate(convs):
        weight = f"w{index}"
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((out, channels, kh, kw)) / np.sqrt(channels * kh * kw)).astype(np.float32), weight))
        output = f"y{index}"
        nodes.append(helper.make_node("Conv", [current, weight], [output], name=f"conv{index}_{kh}x{kw}",
                                      kernel_shape=[kh, kw], pads=[kh // 2, kw // 2, kh // 2, kw // 2]))
        current, channels = output, out
    nodes.append(helper.make_node("Relu", [current], ["out"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, h])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def macs(c: int, h: int, convs) -> int:
    total, channels = 0, c
    for out, (kh, kw) in convs:
        total += h * h * out * channels * kh * kw
        channels = out
    return total


def round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def variants(c: int, d: int, k: int, speedup: float) -> dict[str, list]:
    """The chains of one layer at ``speedup``, ranks rounded to 16, plus the same off the grid."""
    root = np.sqrt(speedup)
    channel_rank = round_to(d * k * k * c / speedup / (k * k * c + d), 16)
    rank_3d = round_to(d * k * k * c / root / (k * k * c + d), 16)
    # spatial split of (k x k, c -> d') to cost what is left of the target once the 1x1 is paid
    budget = d * k * k * c / speedup - d * rank_3d
    spatial_3d = round_to(budget / (k * c + k * rank_3d), 16)
    spatial_only = round_to(d * k * k * c / speedup / (k * c + k * d), 16)
    chains = {
        "channel": [(channel_rank, (k, k)), (d, (1, 1))],
        "3d": [(spatial_3d, (k, 1)), (rank_3d, (1, k)), (d, (1, 1))],
        "spatial": [(spatial_only, (k, 1)), (d, (1, k))],
    }
    for name, chain in list(chains.items()):
        chains[f"{name} off-grid"] = [(out - 5 if i < len(chain) - 1 else out, kernel) for i, (out, kernel) in
                                      enumerate(chain)]
    return chains


def session(model: onnx.ModelProto, threads: int, profile: bool = False, optimized_path: str | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "prof")
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def optimised_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node name, op and kernel) of the graph onnxruntime runs after its CPU optimisations."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "opt.onnx")
        session(model, 1, optimized_path=path)
        optimised = onnx.load(path)
    described = []
    for node in optimised.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = " " + "x".join(map(str, attrs["kernel_shape"])) if "kernel_shape" in attrs else ""
        described.append((node.name, f"{node.domain + ':' if node.domain else ''}{node.op_type}{kernel}"))
    return described


def node_times(model: onnx.ModelProto, feeds, threads: int, runs: int = 20) -> dict[str, float]:
    """Median kernel time (ms) per node from onnxruntime's profiler."""
    sess = session(model, threads, profile=True)
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times.setdefault(event["name"][:-len("_kernel_time")], []).append(event["dur"] / 1e3)
    return {name: float(np.median(values[3:] or values)) for name, values in times.items()}


def interleaved(models: list[onnx.ModelProto], feeds, threads: int, rounds: int) -> list[float]:
    import time

    sessions = [session(m, threads) for m in models]
    for sess in sessions:
        for _ in range(3):
            sess.run(None, feeds)
    times = [[] for _ in sessions]
    for index in range(rounds):
        order = range(len(sessions)) if index % 2 == 0 else reversed(range(len(sessions)))
        for which in order:
            start = time.perf_counter()
            sessions[which].run(None, feeds)
            times[which].append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for c, d, h in LAYERS:
        original = [(d, (3, 3))]
        chains = variants(c, d, 3, args.speedup)
        models = [chain_model(c, h, original)] + [chain_model(c, h, chain) for chain in chains.values()]
        theoretical = [macs(c, h, original) / macs(c, h, chain) for chain in chains.values()]
        for batch, threads in SETTINGS:
            feeds = {"x": np.random.default_rng(1).standard_normal((batch, c, h, h)).astype(np.float32)}
            latency = interleaved(models, feeds, threads, args.rounds)
            for (name, chain), theory, ms in zip(chains.items(), theoretical, latency[1:]):
                rows.append({"layer": f"{c}->{d} 3x3 {h}x{h}", "chain": name,
                             "ranks": [out for out, _ in chain[:-1]], "batch": batch, "threads": threads,
                             "original_ms": latency[0], "chain_ms": ms, "theoretical": theory,
                             "measured": latency[0] / ms, "ratio": latency[0] / ms / theory})
                print(json.dumps(rows[-1]), flush=True)
        feeds = {"x": np.random.default_rng(1).standard_normal((1, c, h, h)).astype(np.float32)}
        for model, (name, chain) in zip(models, [("original", original)] + list(chains.items())):
            per_node = node_times(model, feeds, 1)
            graph = optimised_nodes(model)
            convs = [(node, op) for node, op in graph if op.split(" ")[0].endswith("Conv")]
            inputs = [c] + [out for out, _ in chain]
            gmacs = {f"{op} {inputs[i]}->{out}": h * h * out * inputs[i] * kh * kw / 1e6 / per_node[node]
                     for i, ((node, op), (out, (kh, kw))) in enumerate(zip(convs, chain)) if per_node.get(node)}
            rows.append({"layer": f"{c}->{d} 3x3 {h}x{h}", "chain": name, "optimised_graph": [op for _, op in graph],
                         "node_ms_1thread": {op: per_node.get(node) for node, op in graph}, "conv_gmacs": gmacs})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.json).write_text(json.dumps({"command": "python tools/bench_chains.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()), "onnxruntime": ort.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
