"""A budget search's 3d probes: the split bases kept for every plan its bracket can still probe
(``methods.split_basis``), so that one run of the network serves several probes."""

from __future__ import annotations

import logging

from onnx_lowrank.methods.split_basis import basis_bytes, keep_bases, lacking
from onnx_lowrank.options import Options
from onnx_lowrank.pipeline.analysis import Analysis
from onnx_lowrank.pipeline.plan import split_ranks
from onnx_lowrank.runtime.sessions import batch_size_for


def keep_bracket_bases(analysis: Analysis, opts: Options, plan, speedup: float, probed, cache: dict) -> None:
    """Where the probe of ``plan`` (at ``speedup``) would run the network for its splits, first every
    layer that a plan the bracket can still probe splits (between the ``probed`` speedups either
    side, or a halving and a doubling away) gets its basis in ``cache`` at the highest rank they
    give it."""
    if not lacking(plan.spatial_ranks, cache):
        return
    low = max((s for s in probed if s < speedup), default=1 + (speedup - 1) / 2)
    high = min((s for s in probed if s > speedup), default=2 * speedup)
    ranks = split_ranks(analysis, opts, [low * (high / low) ** (i / 32) for i in range(33)])
    ranks = {name: max(rank, plan.spatial_ranks.get(name, 0)) for name, rank in ranks.items()}
    if basis_bytes(analysis.samples, ranks, analysis.shapes) > opts.sample_memory_mb * 2**20:
        ranks = plan.spatial_ranks  # the bases are kept within --sample-memory: then the probe's own only
    # Its batches' tap outputs within an eighth of --sample-memory; a model's fixed batch is fed whole.
    batch_bytes = None if batch_size_for(analysis.inputs, 0) > 1 else opts.sample_memory_mb * 2**17
    with analysis.run.stage("split_bases", f"the split bases of up to {len(ranks)} layers", logging.DEBUG):
        keep_bases(analysis.normalised, analysis.by_name, ranks, analysis.shapes, analysis.collect, cache, batch_bytes)
