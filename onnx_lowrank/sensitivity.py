"""Measured sensitivity: how much the model's output degrades when only one layer is decomposed,
at each rank of a ladder (AIMET's greedy ratio selection, ASVD's sensitivity-based truncation).

Each layer's chain at a rank is solved symmetrically with a short schedule (so it depends on no
other layer and is solved once), the model with only that layer replaced is run on a subset of
the *calibration* samples (the held-out part stays for the fidelity figures), and the loss is the
relative error of its first output against the original's.
"""

from __future__ import annotations

import logging

from onnx_lowrank.evaluate import compare_outputs, model_outputs
from onnx_lowrank.graph.rewrite import replace_convs
from onnx_lowrank.layers import PROBE_SCHEDULE, solve_layers
from onnx_lowrank.plans import ArchitecturePlan
from onnx_lowrank.ranks import rank_ladder

log = logging.getLogger(__name__)

SUBSET = 32  # calibration samples the losses are measured on


def measure_sensitivity(analysis, opts) -> dict[str, dict[int, float]]:
    """``losses[layer][rank]`` for every decomposable conv but the first (left whole anyway)."""
    data = analysis.data
    step = max(1, len(data.calib_indices) // SUBSET)
    subset = data.calib_indices[::step][:SUBSET]
    reference = model_outputs(analysis.normalised, data.source, subset, data.batch, opts.threads)
    method = "linear" if opts.method == "linear" else "nonlinear"
    units = analysis.by_name
    candidates = analysis.candidates[1:] if len(analysis.candidates) > 1 else analysis.candidates
    ladders = {c.name: rank_ladder(c, opts.rank_multiple) for c in candidates}
    advance = analysis.progress.stage("measuring sensitivity", sum(map(len, ladders.values())))
    losses: dict[str, dict[int, float]] = {}
    cache: dict = {}
    with analysis.run.stage("sensitivity", f"measuring the sensitivity of {len(candidates)} convs"):
        for candidate in candidates:
            losses[candidate.name] = {}
            for rank in ladders[candidate.name]:
                plan = ArchitecturePlan(ranks={candidate.name: rank})
                solved = solve_layers(method, False, analysis.normalised, [units[candidate.name]], plan,
                                      analysis.responses, analysis.stats, analysis.shapes, analysis.collect,
                                      lambda step=1: None, cache, PROBE_SCHEDULE)
                outputs = model_outputs(replace_convs(analysis.normalised, solved.chains), data.source, subset,
                                        data.batch, opts.threads)
                fidelity = compare_outputs(reference, outputs)
                losses[candidate.name][rank] = float(next(iter(fidelity.output_rel_error.values())))
                advance(1)
            log.debug("sensitivity of %s: %s", candidate.name, losses[candidate.name])
    return losses

