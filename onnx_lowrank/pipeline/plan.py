"""The decomposed architecture of a run: ranks by energy, measured sensitivity or measured latency
(paper Eq. 13-14, and the baselines' own plans)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from onnx_lowrank.errors import InfeasibleTargetError
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.measure.latency import LayerLatency, measure_layer_latency, plan_in_model
from onnx_lowrank.measure.sensitivity import measure_sensitivity
from onnx_lowrank.methods.spectra import padded, response_spectrum, weights_spectrum
from onnx_lowrank.options import Options
from onnx_lowrank.planning.plans import (
    ArchitecturePlan,
    channel_plan,
    latency_plan,
    spatial_plan,
    three_d_plan,
    tucker2_plan,
)
from onnx_lowrank.planning.ranks import RankCandidate
from onnx_lowrank.registry import PlanFamily
from onnx_lowrank.solvers import ResponseStats

if TYPE_CHECKING:
    from onnx_lowrank.pipeline.analysis import Analysis

log = logging.getLogger(__name__)


def plan_for(analysis: Analysis, opts: Options) -> ArchitecturePlan:
    """The decomposed architecture for ``opts`` (its speedup and method) on the analysed model."""
    if opts.selection == "sensitivity" and analysis.sensitivity is None:
        if opts.spec.plan is PlanFamily.THREE_D:
            analysis.run.warn("--rank-selection sensitivity measures each layer as a channel decomposition, not the "
                              "3d chain this method builds: it was worse than energy selection on most models "
                              "measured (docs/options.md); energy is the default")
        analysis.sensitivity = measure_sensitivity(analysis, opts)
    if opts.objective == "latency" and analysis.latency is None:
        analysis.latency = measure_layer_latency(analysis, opts)
    def plan_at(speedup: float) -> ArchitecturePlan:
        return _plan_of(analysis, replace(opts, speedup=speedup))

    plan = plan_in_model(analysis, opts, plan_at) if opts.objective == "latency" else plan_at(opts.speedup)
    log.info("plan: %d of %d layers decomposed, theoretical speedup %.2fx", len(plan.layers),
             len(analysis.units), plan.speedup)
    grouped = [u.name for u in analysis.units if u.name in plan.layers and u.group > 1]
    if grouped and opts.objective == "flops":
        analysis.run.warn(f"{len(grouped)} grouped conv(s) decomposed per group ({grouped[0]}, ...): onnxruntime's "
                          "CPU grouped convs do little work per call, and with many groups their chains measured "
                          "slower than the original (benchmarks/HISTORY.md); --objective latency times them first")
    return plan


def split_ranks(analysis: Analysis, opts: Options, speedups: list[float]) -> dict[str, int]:
    """Each layer's highest k x 1 rank (d'') over the plans at ``speedups`` (a latency plan as
    predicted, before its in-model correction); infeasible speedups give none."""
    ranks: dict[str, int] = {}
    for speedup in speedups:
        try:
            plan = _plan_of(analysis, replace(opts, speedup=speedup))
        except InfeasibleTargetError:
            continue
        for name, rank in plan.spatial_ranks.items():
            ranks[name] = max(rank, ranks.get(name, 0))
    return ranks


def _plan_of(analysis: Analysis, opts: Options) -> ArchitecturePlan:
    return _plan(opts, analysis.candidates, analysis.by_name, analysis.stats, analysis.fixed, analysis.channel_only,
                 analysis.sensitivity, analysis.latency if opts.objective == "latency" else None)


def _plan(opts: Options, candidates: list[RankCandidate], units: dict[str, Unit],
          stats: dict[str, ResponseStats], fixed: int, channel_only: set[str],
          sensitivity: dict[str, dict[int, float]] | None = None,
          latency: LayerLatency | None = None) -> ArchitecturePlan:
    """The decomposed architecture. Energy selection ranks by the PCA energy of the responses for
    the data-driven methods, by the spectrum of the weights each baseline truncates otherwise;
    before the responses are collected (no ``stats``) the ranks are uniform."""
    family = opts.spec.plan
    if family is PlanFamily.TUCKER2:
        return tucker2_plan(candidates, fixed, opts.speedup, opts.rank_multiple)
    losses = sensitivity if opts.selection == "sensitivity" else None
    scheme = "spatial" if family is PlanFamily.SPATIAL else "channel"
    spectra = None
    if opts.selection == "energy" and (stats or opts.data_free):
        spectra = ({n: response_spectrum(units[n], s) for n, s in stats.items()} if not opts.data_free else
                   {c.name: padded(weights_spectrum(units[c.name], scheme), c, scheme) for c in candidates})
    if latency is not None and spectra is not None:
        untimed = [c for c in candidates if c.name not in latency.table]
        split = {c.name: padded(weights_spectrum(units[c.name], "spatial"), c, "spatial") for c in candidates
                 if family is PlanFamily.THREE_D and any(form.spatial for form in latency.table.get(c.name, {}))}
        plan = latency_plan([c for c in candidates if c.name in latency.table], spectra, latency.table,
                            latency.fixed_ms, fixed + sum(c.shape.macs for c in untimed), opts.speedup, split)
        plan.skipped.update({c.name: UNTIMED_REASON for c in untimed})
        return plan
    if family is PlanFamily.SPATIAL:
        return spatial_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple)
    if family is PlanFamily.THREE_D:
        return three_d_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple, opts.channel_speedup,
                            tuple(sorted(channel_only)), losses)
    return channel_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple, losses)


UNTIMED_REASON = "--objective latency times 2-D convs and dense layers only: left whole"
