"""The library API: ``compress(model, speedup=...)`` runs the paper's pipeline and returns a Result.

Its stages, each a function a search can repeat: ``analyse`` (load, normalise (fold BN), find the
convs, calibration data, shapes and FLOPs, collect responses) -> ``plan_for`` (ranks, Eq. 13-14)
-> ``solve`` (Eq. 4-12, per layer in ``layers.py``) -> ``report_for`` -> ``rewrite`` (and check)
-> ``measure`` (fidelity and latency). The accuracy budget (``search.py``) sits above them; the
CLI is a thin layer over both.
"""

from __future__ import annotations

import logging
import os

import onnx

from onnx_lowrank.distill import require as require_distillation
from onnx_lowrank.errors import InternalError
from onnx_lowrank.graph.io import check_model
from onnx_lowrank.graph.rewrite import replace_units
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.measure.context import Measuring, ProgressSink, Run
from onnx_lowrank.measure.fidelity import benchmark_providers, compare_outputs, held_out_outputs, measure_fidelity
from onnx_lowrank.methods.chains import Solved, data_free_chains, solve_layers
from onnx_lowrank.methods.spectra import response_spectrum
from onnx_lowrank.options import Options, takes_options
from onnx_lowrank.output.provenance import describe_input, versions
from onnx_lowrank.output.report import LayerReport, Report
from onnx_lowrank.pipeline.analysis import FEW_HELD_OUT, Analysis, Result, analyse
from onnx_lowrank.pipeline.plan import plan_for
from onnx_lowrank.planning.costs import ConvShape
from onnx_lowrank.planning.plans import ArchitecturePlan
from onnx_lowrank.planning.sampling import FEWEST_PER_CHANNEL
from onnx_lowrank.quantize import add_int8
from onnx_lowrank.registry import Solver
from onnx_lowrank.runtime.calibration import CalibrationSource
from onnx_lowrank.runtime.images import Preprocess
from onnx_lowrank.runtime.sessions import make_session
from onnx_lowrank.solvers.factors import spectrum_energy
from onnx_lowrank.solvers.nonlinear import PAPER_SCHEDULE

log = logging.getLogger(__name__)




@takes_options
def compress(
    model: str | os.PathLike[str] | onnx.ModelProto | bytes,
    speedup: float = 4.0,
    *,
    calibration: CalibrationSource = None,
    evaluation: CalibrationSource = None,
    preprocess: Preprocess | None = None,
    progress: ProgressSink | None = None,
    **options,
) -> Result:
    """Make ``model``'s linear layers (convs, transposed convs, dense) about ``speedup`` times
    cheaper in FLOPs by low-rank decomposition.

    ``model`` is a path, ``os.PathLike``, ``onnx.ModelProto`` or serialized bytes. ``calibration``
    is an image folder, a .npy/.npz path, ``file.py:ReaderName``, a NumPy array (single-input
    models), a dict of arrays keyed by input name, an object with ``get_next()`` (onnxruntime's
    ``CalibrationDataReader``), or None (random inputs: a warning, and a poor result).
    ``evaluation`` takes the same forms (with ``labels`` in an .npz or dict for accuracy) and is
    used to measure fidelity instead of the held-out part of the calibration data. The other
    keywords are the fields of :class:`~onnx_lowrank.options.Options` (the CLI's flags, without
    the dashes); a name option (``skip``, ``channel_only``, ``ops``, ``providers``) takes one
    string or a sequence of them.
    """
    opts = Options.from_keywords(speedup=speedup, **options)
    if opts.distill:
        require_distillation(opts.distill_device)
    analysis = analyse(model, opts, calibration, evaluation, preprocess, progress)
    plan = plan_for(analysis, opts)
    solved = solve(analysis, plan, opts) if not opts.dry_run else Solved()
    report = report_for(analysis, plan, solved, opts)
    ending = analysis.ending()
    if opts.dry_run:
        return ending.finish(None, report)
    optimized = rewrite(analysis, solved)
    hints = hint_tensors(analysis, solved)
    del analysis, solved  # the layers, their responses and factors go before the measurements
    if opts.distill:
        optimized = distill(ending.measuring, optimized, hints, report, opts)
    measure(ending.measuring, optimized, report, opts)
    if opts.quantize:
        optimized = add_int8(ending.measuring, optimized, report, opts)
    return ending.finish(optimized, report)


def solve(analysis: Analysis, plan: ArchitecturePlan, opts: Options, cache: dict | None = None,
          schedule=PAPER_SCHEDULE, solver: Solver | None = None) -> Solved:
    """The replacement chain of every layer the plan decomposes (paper §3.1-3.5, or a baseline);
    ``cache`` and ``schedule`` as for ``methods.chains.solve_layers``; ``solver`` in
    place of the method's (the budget search's probes)."""
    _warn_if_few_samples(opts, analysis.samples, plan.ranks, analysis.units, analysis.run)
    chosen = [u for u in analysis.units if u.name in plan.layers]
    log.info("solving %d layers (%s%s)", len(chosen), opts.method, ", symmetric" if not opts.asymmetric else "")
    if opts.data_free:
        solved = data_free_chains(opts.spec.solver, chosen, plan)
    else:
        solved = solve_layers(solver or opts.spec.solver, opts.asymmetric, analysis.normalised, chosen, plan, analysis.responses,
                              analysis.stats, analysis.shapes, analysis.collect,
                              analysis.progress.stage("solving", len(chosen)), cache, schedule, analysis.cuts)
    for key, seconds in solved.timings.items():
        analysis.run.add_time(key, seconds)
    return solved


def report_for(analysis: Analysis, plan: ArchitecturePlan, solved: Solved, opts: Options) -> Report:
    by_kind = analysis.macs_by_kind()
    after = {kind: macs - sum(analysis.shapes[u.name].macs - plan.layer_macs(u.name, analysis.shapes[u.name])
                              for u in analysis.units if u.kind == kind and u.name in plan.layers)
             for kind, macs in by_kind.items()}
    total = sum(by_kind.values())
    return Report(
        speedup_target=opts.speedup, method=opts.method, rank_selection=opts.selection,
        calibration=analysis.data.source.description, calibration_samples=len(analysis.data.calib_indices),
        theoretical_speedup=plan.speedup,
        theoretical_model_speedup=total / max(sum(after.values()), 1),
        theoretical_speedup_by_kind={kind: by_kind[kind] / max(after[kind], 1) for kind in sorted(by_kind)},
        layers=[_layer_report(u, analysis.shapes.get(u.name), plan, analysis.stats, solved,
                              analysis.samples.get(u.name)) for u in analysis.units],
        warnings=analysis.run.warnings, timings_s=analysis.run.timings, peak_memory_mib=analysis.run.peak_memory,
        dry_run=opts.dry_run,
        symmetric=not opts.asymmetric,
        asymmetric_collection_passes=(solved.prefix_macs / total
                                      if (opts.asymmetric or solved.prefix_macs) and not opts.dry_run else None),
        channel_speedup=plan.channel_speedup, options=opts.to_dict(),
        latency_plan=None if plan.predicted_ms is None else {**analysis.latency.describe(),
                                                             "predicted_ms": list(plan.predicted_ms),
                                                             "in_model": plan.in_model},
        files={"input": describe_input(analysis.model_source)}, versions=versions())


def rewrite(analysis: Analysis, solved: Solved, level: int = logging.INFO) -> onnx.ModelProto:
    """The model with the solved chains in place, checked; a large model's weights go to disk.
    ``level``: of the stage's log line (a search rewrites many times)."""
    with analysis.run.stage("rewrite", "rewriting the graph", level):
        optimized = replace_units(analysis.normalised, solved.chains)
        if analysis.store is not None:
            optimized = analysis.store.keep(optimized)
        _check_rewritten(optimized)
    return optimized


def hint_tensors(analysis: Analysis, solved: Solved) -> list[str]:
    """The decomposed layers' output tensors, which distillation matches to the original's."""
    return [u.output for u in analysis.units if u.name in solved.chains]


def distill(measuring: Measuring, optimized: onnx.ModelProto, hints: list[str], report: Report,
            opts: Options) -> onnx.ModelProto:
    """The low-rank model trained toward the original (``distill.stage``), or as it was."""
    from onnx_lowrank.distill.stage import distill as distill_stage

    distilled = distill_stage(measuring, optimized, hints, opts)
    report.distill = distilled.section
    return distilled.model


def measure(measuring: Measuring, optimized: onnx.ModelProto, report: Report, opts: Options,
            reference: dict | None = None, outputs: dict | None = None) -> None:
    """Fidelity on the held-out set and, with ``bench``, latency original vs optimized;
    ``reference`` and ``outputs``: the original's and ``optimized``'s held-out outputs, where a
    budget search has them already."""
    data, run = measuring.data, measuring.run
    if len(data.holdout_indices) < FEW_HELD_OUT:
        run.warn(f"fidelity is measured on only {len(data.holdout_indices)} held-out samples: its figures are "
                 f"rough (aim for {FEW_HELD_OUT} or more: more calibration data, or --eval)")
    with run.stage("fidelity", f"measuring fidelity on {len(data.holdout_indices)} held-out samples"):
        report.fidelity = (measure_fidelity(measuring.reference, optimized, data, opts.threads) if reference is None
                           else compare_outputs(reference, outputs if outputs is not None else held_out_outputs(
                               optimized, data, opts.threads, produced=True), data.held_out_labels()))
    if opts.bench:
        with run.stage("benchmark", "measuring latency, original vs optimized"):
            feeds = measuring.benchmark_feeds(opts.bench_batch)
            report.latency_ms, report.actual_speedup = benchmark_providers(
                measuring.reference, optimized, feeds, opts.providers, threads=opts.threads, rounds=opts.bench_rounds,
                advance=measuring.progress.stage("benchmarking", len(opts.providers)))


def _warn_if_few_samples(opts: Options, samples: dict[str, int], ranks, units, run: Run) -> None:
    """The nonlinear and asymmetric fits regress d outputs on d inputs; with few samples per channel
    they fit the calibration set better than new inputs (measured on CRAFT: benchmarks/HISTORY.md). Even
    PCA sees at most as many directions as it has samples (a dense head gets one per image), and
    rank selection takes the rest for empty. Told for the layer with the fewest per channel."""
    decomposed = [u for u in units if u.name in ranks and u.name in samples]
    if not decomposed:
        return
    worst = min(decomposed, key=lambda u: samples[u.name] / u.weight.shape[0])
    count, channels = samples[worst.name], worst.weight.shape[0]
    if opts.spec.solver is Solver.PCA and count < channels:
        run.warn(f"{count} response samples for {channels} channels ({worst.name}): its PCA sees at most {count} "
                 "directions, and rank selection takes the rest for empty; give more calibration data")
    elif opts.spec.solver is not Solver.PCA and count < FEWEST_PER_CHANNEL * channels:
        run.warn(f"{count} response samples for {channels} channels ({worst.name}): "
                 f"the {opts.method} fit may not generalise; aim for {FEWEST_PER_CHANNEL} samples per "
                 "channel (more calibration images; a larger --sample-memory or --samples-per-image if set)")


def _layer_report(unit: Unit, shape: ConvShape | None, plan: ArchitecturePlan, stats,
                  solved: Solved, samples: int | None) -> LayerReport:
    before = shape.macs if shape else 0
    decomposed = unit.name in plan.layers
    return LayerReport(
        name=unit.name, op=unit.op, kernel=list(unit.kernel), in_channels=shape.in_channels if shape else 0,
        out_channels=shape.out_channels if shape else 0, activation=unit.activation.kind,
        rank=plan.ranks.get(unit.name), spatial_rank=plan.spatial_ranks.get(unit.name),
        input_rank=plan.input_ranks.get(unit.name), flops_before=2 * before,
        flops_after=2 * (plan.layer_macs(unit.name, shape) if decomposed else before),
        energy=(spectrum_energy(response_spectrum(unit, stats[unit.name]), plan.ranks[unit.name])
                if unit.name in stats and unit.name in plan.ranks else None),
        response_error=solved.errors.get(unit.name), solver_iterations=solved.iterations.get(unit.name),
        skipped_reason=unit.skipped_reason or plan.skipped.get(unit.name), note=plan.notes.get(unit.name),
        samples=samples, seconds=solved.seconds.get(unit.name))



def _check_rewritten(model: onnx.ModelProto) -> None:
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the rewritten model fails the ONNX checker: {exc}") from None
    make_session(model, optimize=False, produced=True)
