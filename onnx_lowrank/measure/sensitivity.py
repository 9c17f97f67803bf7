"""Measured sensitivity: how much the model's output degrades when only one layer is decomposed,
at each rank of a ladder (AIMET's greedy ratio selection, ASVD's sensitivity-based truncation).

Each layer's chain at a rank is its PCA chain (Eq. 4, the symmetric problem's closed form, read
from the statistics the analysis has: it depends on no other layer and costs no solve; a short
run of the nonlinear solver, tried before, selected the same plans on the demo and Silero and
as good a one on EfficientNet-Lite0, at 3-8x the sensitivity's time). The model with only that
layer replaced is run on a subset of the *calibration* samples (the held-out part stays for the
fidelity figures), and the loss is the relative error of its first output against the original's.

Only the part of the network from the layer on is run for each rank: the tensors it reads from
before the layer (the cut) are computed once per layer, by the part before it, and fed to the
suffix, whose output is the whole model's. Where the cut would take more than ``CUT_MEMORY``
bytes (wide early maps of a large input) the whole model is run instead. A layer's chains at
its ranks differ in the rank alone, so one session of the suffix with the top rank's chain
serves them all: each rank's weights are fed to it, zero-padded to the top rank's shapes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.errors import InternalError
from onnx_lowrank.graph.rewrite import NodeSpec, differ_in_rank_alone, padded_like, replace_unit_fed, replace_units
from onnx_lowrank.graph.surgery import prefix_model, suffix_model
from onnx_lowrank.measure.context import LayerAnalysis
from onnx_lowrank.measure.fidelity import compare_outputs, model_outputs
from onnx_lowrank.methods.chains import solve_layers
from onnx_lowrank.options import Options
from onnx_lowrank.planning.plans import ArchitecturePlan
from onnx_lowrank.planning.ranks import RankPlan, leave_first_conv, rank_ladder
from onnx_lowrank.registry import Solver
from onnx_lowrank.runtime.sessions import batch_chunks, make_session, run, run_in_batches

log = logging.getLogger(__name__)

SUBSET = 32  # calibration samples the losses are measured on
CUT_MEMORY = 1 << 30


def measure_sensitivity(analysis: LayerAnalysis, opts: Options) -> dict[str, dict[int, float]]:
    """``losses[layer][rank]`` for every decomposable conv but the first (left whole anyway)."""
    data = analysis.data
    step = max(1, len(data.calib_indices) // SUBSET)
    subset = data.calib_indices[::step][:SUBSET]
    reference = model_outputs(analysis.normalised, data.source, subset, data.batch, opts.threads)
    units = analysis.by_name
    candidates = leave_first_conv(RankPlan(), list(analysis.candidates))  # as every plan does
    ladders = {c.name: rank_ladder(c, opts.rank_multiple) for c in candidates}
    advance = analysis.progress.stage("measuring sensitivity", sum(map(len, ladders.values())))
    losses: dict[str, dict[int, float]] = {}
    with analysis.run.stage("sensitivity", f"measuring the sensitivity of {len(candidates)} layers"):
        for candidate in candidates:
            unit = units[candidate.name]

            def chain_at(rank: int, unit=unit) -> list[NodeSpec]:
                # A cache keeps the analysis's responses (solve_layers consumes them without one).
                return solve_layers(Solver.PCA, False, analysis.normalised, [unit],
                                    ArchitecturePlan(ranks={unit.name: rank}), analysis.responses, analysis.stats,
                                    analysis.shapes, analysis.collect, lambda step=1: None, {}).chains[unit.name]

            losses[candidate.name] = {}
            for rank, outputs in _outputs_by_rank(analysis.normalised, candidate.name, chain_at,
                                                  ladders[candidate.name], data, subset, opts.threads):
                losses[candidate.name][rank] = float(max(compare_outputs(reference, outputs).output_rel_error.values()))
                advance(1)
            log.debug("sensitivity of %s: %s", candidate.name, losses[candidate.name])
    return losses


def _outputs_by_rank(model: onnx.ModelProto, layer: str, chain_at, ranks: list[int], data, subset, threads: int):
    """Each rank's model outputs on ``subset``, with the layer alone replaced by its chain at that
    rank (``chain_at``): from the cut (``_suffix_and_cut``), else from the inputs. A chain that
    differs from the top rank's in its rank alone is fed, zero-padded (``graph.rewrite.padded_like``),
    to one session of the top rank's chain: a rewrite and a session per layer, not per rank (on
    VGG-16 each copied the dense layers' 500 MB of weights); a grouped layer's get a session each.
    One chain of the layer is held at a time besides the top rank's (fc6's seven: 0.9 GB)."""
    if not ranks:
        return
    suffix, batches = _suffix_and_cut(model, layer, data, subset, threads)
    if suffix is None:
        suffix, batches = model, [data.source.get(chunk) for chunk in batch_chunks(subset, data.batch)]
    top = chain_at(max(ranks))
    if not differ_in_rank_alone(top, top):  # grouped: its rank is per group, its channels not at the end
        for rank in ranks:
            chain = top if rank == max(ranks) else chain_at(rank)
            yield rank, _run_on(make_session(replace_units(suffix, {layer: chain}), threads=threads, produced=True),
                                batches)
        return
    fed, names = replace_unit_fed(suffix, layer, top)
    del suffix  # the session holds its own copy of the weights: no other while it is built
    session = make_session(fed, threads=threads, produced=True)
    del fed
    for rank in ranks:
        arrays = padded_like(top if rank == max(ranks) else chain_at(rank), top)
        if arrays is None:
            raise InternalError(f"the chains of {layer} differ in more than their rank")
        yield rank, _run_on(session, [{**batch, **dict(zip(names, arrays))} for batch in batches])
        del arrays  # before the next rank's chain is built (fc6's: 308 MB)


def _suffix_and_cut(model: onnx.ModelProto, layer: str, data, subset, threads: int):
    """The model from ``layer`` on, and the cut's values for each batch of ``subset``; (None, None)
    where the cut would hold more than ``CUT_MEMORY`` bytes or holds a graph output."""
    suffix, cut = suffix_model(model, layer)
    inputs = {i.name for i in model.graph.input}
    if set(cut) & {o.name for o in model.graph.output}:
        return None, None
    computed = [name for name in cut if name not in inputs]
    feeds: list[dict[str, np.ndarray]] = []
    held = 0

    def keep(chunk, batch_feeds, outputs) -> None:
        nonlocal held
        values = {name: batch_feeds[name] for name in cut if name in inputs} | dict(zip(computed, outputs))
        held += sum(v.nbytes for v in values.values())
        if held > CUT_MEMORY:
            raise _CutTooLarge
        feeds.append(values)

    try:
        if computed:  # only the network before the layer runs, with only its weights
            session = make_session(prefix_model(model, computed), threads=threads, prepack=False)
            run_in_batches(session, data.source, subset, data.batch, keep, names=computed)
        else:
            for chunk in batch_chunks(subset, data.batch):
                keep(chunk, data.source.get(chunk), [])
    except _CutTooLarge:
        log.debug("sensitivity of %s: the cut exceeds %d bytes, the whole model is run", layer, CUT_MEMORY)
        return None, None
    for value_info in suffix.graph.input:  # the cut's types, as computed
        value = feeds[0][value_info.name]
        value_info.CopyFrom(helper.make_tensor_value_info(value_info.name,
                                                          helper.np_dtype_to_tensor_dtype(value.dtype), None))
    return suffix, feeds


class _CutTooLarge(Exception):
    pass


def _run_on(session, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    parts = [run(session, names, batch, produced=True) for batch in batches]
    return {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(names)}
