"""Issue 13: a grouped conv decomposed per group or as a whole, what pays on the CPU provider.

For grouped 3 x 3 convs of ResNeXt / RegNet / AlexNet shapes, at the MACs of a 2x (and 4x)
theoretical speedup, times interleaved in one process (medians, 1 thread, batch 1):

* the original grouped conv;
* the per-group chain the tool writes: grouped (3 x 3, c -> R) then grouped (1 x 1, R -> d), rank
  R / G per group (block-diagonal factors);
* the whole-layer chain: (3 x 3, c -> r) over all input channels then (1 x 1, r -> d), at the rank
  r = R / G that costs the same MACs (a dense chain reads every input channel, so it buys G times
  less rank for the same cost).

    python tools/bench_grouped.py --json benchmarks/issue13/grouped.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.graph.rewrite import channel_decomposition, replace_units
from onnx_lowrank.measure.fidelity import interleaved_times
from onnx_lowrank.planning.costs import ConvShape, decomposed_macs
from onnx_lowrank.solvers import LowRankFactors
from onnx_lowrank.solvers.grouped import fit_per_group

LAYERS = [(128, 32, 56), (256, 32, 28), (512, 32, 14), (1024, 32, 7),  # ResNeXt-50 32x4d
          (224, 14, 28), (448, 56, 14),  # RegNetX-ish group width 16 / 8
          (256, 2, 27), (384, 2, 13)]  # AlexNet conv2 / conv4


def grouped_model(channels: int, groups: int, size: int):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((channels, channels // groups, 3, 3)) / np.sqrt(9 * channels / groups)).astype(np.float32)
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": groups}
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", **attrs)
    graph = helper.make_graph([node], "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(channels, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), weight, attrs


def orthogonal(rng, rows: int, rank: int) -> LowRankFactors:
    q = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    return LowRankFactors(q, q, np.zeros(rows))


def chains(channels: int, groups: int, size: int, speedup: float) -> dict:
    model, weight, attrs = grouped_model(channels, groups, size)
    shape = ConvShape(channels, channels, (3, 3), (size, size), group=groups)
    step = groups * -(-16 // groups)  # the tool's rank grid for a grouped conv (ranks.RankCandidate.step)
    total = max(step, round(shape.macs / speedup / decomposed_macs(shape, 1) / step) * step)
    rng = np.random.default_rng(1)
    blocks = fit_per_group(channels, groups, total, lambda part, rank: orthogonal(rng, part.stop - part.start, rank))
    per_group = replace_units(model, {"layer": channel_decomposition(attrs, weight, np.zeros(channels), blocks.P,
                                                                     blocks.Q, np.zeros(channels))})
    dense_weight = np.zeros((channels, channels, 3, 3), np.float32)  # the grouped weight, block diagonal
    width = channels // groups
    for g in range(groups):
        dense_weight[g * width:(g + 1) * width, g * width:(g + 1) * width] = weight[g * width:(g + 1) * width]
    dense_rank = max(1, total // groups)
    basis = orthogonal(rng, channels, dense_rank)
    whole = replace_units(model, {"layer": channel_decomposition({k: v for k, v in attrs.items() if k != "group"},
                                                                 dense_weight, np.zeros(channels), basis.P, basis.Q,
                                                                 np.zeros(channels))})
    feeds = {"x": rng.standard_normal((1, channels, size, size)).astype(np.float32)}
    times = [float(np.median(t)) for t in interleaved_times([model, per_group, whole], feeds, threads=1, rounds=40)]
    dense_shape = ConvShape(channels, channels, (3, 3), (size, size))
    return {"channels": channels, "groups": groups, "size": size, "speedup_target": speedup,
            "per_group_rank": total, "whole_rank": dense_rank,
            "theoretical_per_group": shape.macs / decomposed_macs(shape, total),
            "theoretical_whole": shape.macs / decomposed_macs(dense_shape, dense_rank),
            "ms": {"original": times[0], "per_group": times[1], "whole": times[2]},
            "measured_per_group": times[0] / times[1], "measured_whole": times[0] / times[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for channels, groups, size in LAYERS:
        for speedup in (2.0, 4.0):
            rows.append(chains(channels, groups, size, speedup))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.json, "w") as stream:
        json.dump(rows, stream, indent=1)


if __name__ == "__main__":
    main()
