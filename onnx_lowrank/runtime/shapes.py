"""Per-sample cost shapes (``costs.ConvShape``) of every layer, from one probe run of the model."""

from __future__ import annotations

import math
import sys

import numpy as np

from onnx_lowrank.graph.surgery import cut_before
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.planning.costs import ConvShape
from onnx_lowrank.runtime.sessions import batch_size_for, probe_shapes


def measure_shapes(model, source, units, inputs, threads) -> tuple[dict[str, ConvShape], dict[str, int]]:
    """Per-sample ConvShape (``costs``) of every layer, and the bytes per sample of the cut before
    each decomposable one (``graph.surgery.cut_before``: what the Eq. 12 re-collection carries
    from layer to layer), from one probe run."""
    probe_batch = batch_size_for(inputs, 1)
    units = [u for u in units if not u.in_subgraph]
    cuts = {u.name: cut_before(model, u.name) for u in units if u.decomposable}
    tensors = {u.output for u in units} | {u.input for u in units} | {name for cut in cuts.values() for name in cut}
    shapes = probe_shapes(model, source, sorted(tensors), probe_batch, threads)
    cut_bytes = {name: sum(4 * math.prod(shapes[t]) for t in cut) // probe_batch
                 if all(shapes[t] is not None for t in cut) else sys.maxsize for name, cut in cuts.items()}
    return {unit.name: layer_shape(unit, shapes[unit.input], shapes[unit.output]) for unit in units}, cut_bytes


def layer_shape(unit: Unit, inp: tuple, out: tuple) -> ConvShape:
    if unit.kind == "dense":  # x W on every row of a [B, ..., K] input
        rows = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        return ConvShape(int(inp[-1]) if inp else 0, int(out[-1]) if out else 0, (1, 1), (rows, 1))
    kernel, spatial, in_spatial = unit.kernel, out[2:], inp[2:]
    if len(kernel) == 1:  # a 1-D conv: a k x 1 one
        kernel, spatial, in_spatial = (kernel[0], 1), (spatial[0], 1), (in_spatial[0], 1)
    elif len(kernel) == 3:  # (t, h, w) as (h w, t): the spatial split's first conv is the kh x kw one
        kernel = (kernel[1] * kernel[2], kernel[0])
        spatial, in_spatial = ((spatial[1] * spatial[2], spatial[0]), (in_spatial[1] * in_spatial[2], in_spatial[0]))
    in_channels = unit.weight_shape[1] * unit.group if len(unit.weight_shape) > 1 else 0
    return ConvShape(in_channels, int(out[1]), tuple(kernel), tuple(spatial), unit.group, tuple(in_spatial),
                     transposed=unit.kind == "transpose")
