"""The library API: ``compress(model, speedup=...)`` runs the paper's pipeline and returns a Result.

Its stages, each a function a search can repeat: ``analyse`` (load, normalise (fold BN), find the
convs, calibration data, shapes and FLOPs, collect responses) -> ``plan_for`` (ranks, Eq. 13-14)
-> ``solve`` (Eq. 4-12, per layer in ``layers.py``) -> ``report_for`` -> ``rewrite`` (and check)
-> ``measure`` (fidelity and latency). The accuracy budget (``search.py``) sits above them; the
CLI is a thin layer over both.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import numpy as np
import onnx

from onnx_lowrank.runtime.calibration import (AugmentedViews, CalibrationSource, ImageFolderSource, Preprocess, model_inputs,
                                      open_calibration)
from onnx_lowrank.planning.costs import ConvShape
from onnx_lowrank.errors import CalibrationError, InternalError, InvalidOptionError
from onnx_lowrank.measure.fidelity import benchmark_providers, measure_fidelity
from onnx_lowrank.graph.io import WeightStore, check_model, is_large, load_model, model_path
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.rewrite import replace_units
from onnx_lowrank.graph.units import Unit, find_units
from onnx_lowrank.planning.plans import (ArchitecturePlan, channel_plan, latency_plan, spatial_plan, three_d_plan,
                                tucker2_plan)
from onnx_lowrank.measure.latency import LayerLatency, measure_layer_latency, plan_in_model
from onnx_lowrank.options import LAYER_KINDS, Options
from onnx_lowrank.output.provenance import describe_input, versions
from onnx_lowrank.quantize import add_int8
from onnx_lowrank.planning.ranks import RankCandidate
from onnx_lowrank.output.report import LayerReport, Report
from onnx_lowrank.graph.selection import select_units
from onnx_lowrank.runtime.shapes import measure_shapes
from onnx_lowrank.methods.spectra import padded, response_spectrum, weights_spectrum
from onnx_lowrank.planning.sampling import ResponseShape, positions_per_image
from onnx_lowrank.measure.sensitivity import measure_sensitivity
from onnx_lowrank.methods.chains import Solved, data_free_chains, solve_layers
from onnx_lowrank.runtime.sessions import batch_size_for, collect_responses, make_session, mixed_builds_warning, onnxruntime_builds
from onnx_lowrank.solvers import ResponseStats
from onnx_lowrank.solvers.nonlinear import PAPER_SCHEDULE
from onnx_lowrank.solvers.factors import spectrum_energy

RANDOM_CALIBRATION_WARNING = ("no calibration data given: using random inputs. The responses of random "
                              "inputs say little about real ones, so expect a poor model; pass --calib")

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    """Where a run reports its progress: ``stage(description, total)`` returns ``advance(n=1)``."""

    def stage(self, description: str, total: int) -> Callable[[int], None]: ...


class NullProgress:
    """Progress sink that shows nothing; the CLI passes one that draws bars or logs lines."""

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        return lambda advance=1: None


@dataclass
class Result:
    """The optimized model (None for a dry run) and the report of what was done and measured.

    The model of a run on a model too large for one protobuf is a light proto whose weights stay
    in a temporary store as long as this Result lives: write it with :meth:`save`."""

    model: onnx.ModelProto | None
    report: Report
    store: WeightStore | None = field(default=None, repr=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model atomically to ``path`` (.onnx; large models with ``path.data`` beside it)."""
        from onnx_lowrank.output.staging import Staging, check_outputs

        if self.model is None:
            raise InvalidOptionError("a dry run has no model to save")
        with Staging(check_outputs(None, path)) as staging:
            staging.model(self.model)
            staging.commit()


def compress(
    model: str | os.PathLike[str] | onnx.ModelProto | bytes,
    speedup: float = 4.0,
    *,
    calibration: CalibrationSource = None,
    evaluation: CalibrationSource = None,
    preprocess: Preprocess | None = None,
    progress: ProgressSink | None = None,
    method: str = "asymmetric",
    symmetric: bool = False,
    rank_selection: str | None = None,
    channel_speedup: float | None = None,
    channel_only: str | Sequence[str] = (),
    rank_multiple: int = 16,
    num_images: int = 300,
    holdout: int = 100,
    samples_per_image: int | None = None,
    sample_memory_mb: int = 2048,
    seed: int = 0,
    skip: str | Sequence[str] = (),
    ops: str | Sequence[str] = LAYER_KINDS,
    providers: str | Sequence[str] = ("cpu",),
    threads: int = 0,
    bench: bool = True,
    bench_rounds: int = 30,
    batch_size: int = 8,
    dry_run: bool = False,
    input_size: tuple[int, int] | None = None,
    augment: int = 0,
    objective: str = "flops",
    latency_cache: str | os.PathLike[str] | None = None,
    bench_batch: int = 1,
    quantize: str | None = None,
    int8_calibration: str = "minmax",
    int8_tolerance: float = 0.05,
) -> Result:
    """Make ``model``'s linear layers (convs, transposed convs, dense) about ``speedup`` times
    cheaper in FLOPs by low-rank decomposition.

    ``model`` is a path, ``os.PathLike``, ``onnx.ModelProto`` or serialized bytes. ``calibration``
    is an image folder, a .npy/.npz path, ``file.py:ReaderName``, a NumPy array (single-input
    models), a dict of arrays keyed by input name, an object with ``get_next()`` (onnxruntime's
    ``CalibrationDataReader``), or None (random inputs: a warning, and a poor result).
    ``evaluation`` takes the same forms (with ``labels`` in an .npz or dict for accuracy) and is
    used to measure fidelity instead of the held-out part of the calibration data. The other
    keywords are the fields of :class:`~onnx_lowrank.options.Options`; a name option (``skip``,
    ``channel_only``, ``providers``) takes one string or a sequence of them.
    """
    opts = Options(speedup=speedup, method=method, symmetric=symmetric, rank_selection=rank_selection,
                   channel_speedup=channel_speedup, channel_only=channel_only, rank_multiple=rank_multiple,
                   num_images=num_images, holdout=holdout, samples_per_image=samples_per_image,
                   sample_memory_mb=sample_memory_mb, seed=seed,
                   skip=skip, ops=ops, providers=providers, threads=threads, bench=bench, bench_rounds=bench_rounds,
                   batch_size=batch_size, dry_run=dry_run, input_size=input_size, augment=augment,
                   objective=objective, latency_cache=latency_cache, bench_batch=bench_batch, quantize=quantize,
                   int8_calibration=int8_calibration, int8_tolerance=int8_tolerance)
    analysis = analyse(model, opts, calibration, evaluation, preprocess, progress)
    plan = plan_for(analysis, opts)
    solved = solve(analysis, plan, opts) if not opts.dry_run else Solved()
    report = report_for(analysis, plan, solved, opts)
    if opts.dry_run:
        return analysis.finish(None, report)
    optimized = rewrite(analysis, solved, final=True)
    del solved
    measure(analysis, optimized, report, opts)
    if opts.quantize:
        optimized = add_int8(analysis, optimized, report, opts)
    return analysis.finish(optimized, report)


@dataclass
class Analysis:
    """What a run computes once per model and data, before any plan: the normalised model, its
    convs and their shapes, the calibration and held-out sets, the sampled responses."""

    model_source: object
    reference: object  # the original model for sessions: its file where there is one
    normalised: onnx.ModelProto
    store: WeightStore | None
    units: list[Unit]
    channel_only: set[str]
    inputs: list
    data: "_Data"
    shapes: dict[str, ConvShape]
    candidates: list[RankCandidate]
    fixed: int
    collect: dict
    stats: dict[str, ResponseStats]
    responses: dict[str, np.ndarray]
    samples: dict[str, int]
    run: "Run"
    progress: "ProgressSink"
    sensitivity: dict[str, dict[int, float]] | None = None  # measured once, when a plan asks for it
    latency: LayerLatency | None = None  # --objective latency: measured once

    @property
    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def macs_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for unit in self.units:
            if unit.name in self.shapes:
                kinds[unit.kind] = kinds.get(unit.kind, 0) + self.shapes[unit.name].macs
        return kinds

    def benchmark_feeds(self, batch: int) -> dict:
        """The first held-out sample, repeated to the batch latency is measured at."""
        return self.data.eval_source.get(self.data.holdout_indices[:1] * batch_size_for(self.inputs, batch))

    def finish(self, optimized: onnx.ModelProto | None, report: Report) -> "Result":
        self.run.timings["total"] = time.perf_counter() - self.run.started
        return Result(optimized, report, self.store)


def analyse(model, opts: Options, calibration: CalibrationSource = None, evaluation: CalibrationSource = None,
            preprocess: Preprocess | None = None, progress: "ProgressSink | None" = None,
            fixed_target: bool = True, needs_labels: str | None = None) -> Analysis:
    """Load, normalise, find the convs, open the data, measure shapes and collect the responses.
    With a ``fixed_target`` (not a search) an infeasible speedup is refused before the collection;
    ``needs_labels`` names the option that makes labels necessary, refused without them."""
    progress = progress or NullProgress()
    run = Run()
    if mixed := mixed_builds_warning(onnxruntime_builds()):
        run.warn(mixed)
    # Bad input shows up here; it is told in one line, without stage lines before it.
    with run.stage("analyse", "loading and analysing the model", logging.DEBUG):
        original = load_model(model)
        # Sessions of the original read the user's file where there is one: no second copy in memory.
        reference = model_path(model) if isinstance(model, (str, os.PathLike)) else original
        normalised = normalise(original)
        del original
        store = WeightStore() if is_large(normalised) else None
        if store is not None and opts.quantize:
            raise InvalidOptionError("--quantize is not built for models over 2 GiB yet", hint="drop --quantize")
        if store is not None:  # from here on the weights are on disk, read as memory maps
            normalised = store.keep(normalised)
            gc.collect()
        units = find_units(normalised)
        channel_only_names = select_units(units, opts)
        inputs = model_inputs(normalised)
        data = _open_data(calibration, evaluation, preprocess, inputs, opts, run)
        if needs_labels and getattr(data.eval_source, "labels", None) is None:
            raise InvalidOptionError(f"{needs_labels} needs labels",
                                     hint="pass --eval (or --calib) data with 'labels'")
        shapes = measure_shapes(normalised, data.source, units, inputs, opts.threads)
    candidates = [RankCandidate(u.name, shapes[u.name], dense=u.kind == "dense") for u in units if u.decomposable]
    fixed = sum(shapes[u.name].macs for u in units
                if u.name in shapes and u.kind in opts.ops and not u.decomposable)
    if fixed_target and opts.objective == "flops":
        _plan(opts, candidates, {u.name: u for u in units}, {}, fixed, channel_only_names)  # fail before the work
    collect = dict(source=data.source, indices=data.calib_indices,
                   samples_per_image=_positions(opts, units, shapes, len(data.calib_indices)),
                   seed=opts.seed, batch_size=data.batch, threads=opts.threads,
                   channel_axes={u.output: u.channel_axis for u in units if u.decomposable})
    stats, responses, samples = {}, {}, {}
    if not opts.data_free and (not opts.dry_run or opts.selection != "uniform"):
        with run.stage("collect", f"collecting responses of {len(candidates)} layers"):
            decomposable = [u for u in units if u.decomposable]
            responses = collect_responses(normalised, tensors=[u.output for u in decomposable],
                                          progress=progress.stage("collecting responses", len(data.calib_indices)),
                                          **collect)
            stats = {u.name: ResponseStats.from_responses(responses[u.output]) for u in decomposable}
            samples = {u.name: len(responses[u.output]) for u in decomposable}
    if opts.rank_multiple % NCHWC_BLOCK:
        run.warn(f"--rank-multiple {opts.rank_multiple} is not a multiple of {NCHWC_BLOCK}: onnxruntime's CPU "
                 "NCHWc kernels only take a conv whose input channels are a multiple of their block (16 with "
                 "AVX-512, 8 with AVX2), so off-grid ranks run as slower NCHW convs with reorders")
    return Analysis(model, reference, normalised, store, units, channel_only_names, inputs, data, shapes,
                    candidates, fixed, collect, stats, responses, samples, run, progress)


def plan_for(analysis: Analysis, opts: Options) -> ArchitecturePlan:
    """The decomposed architecture for ``opts`` (its speedup and method) on the analysed model."""
    if opts.selection == "sensitivity" and analysis.sensitivity is None:
        analysis.sensitivity = measure_sensitivity(analysis, opts)
    if opts.objective == "latency" and analysis.latency is None:
        analysis.latency = measure_layer_latency(analysis, opts)
    def plan_at(speedup: float) -> ArchitecturePlan:
        return _plan(replace(opts, speedup=speedup), analysis.candidates, analysis.by_name,
                     analysis.stats, analysis.fixed, analysis.channel_only, analysis.sensitivity,
                     analysis.latency if opts.objective == "latency" else None)

    plan = plan_in_model(analysis, opts, plan_at) if opts.objective == "latency" else plan_at(opts.speedup)
    log.info("plan: %d of %d layers decomposed, theoretical speedup %.2fx", len(plan.layers),
             len(analysis.units), plan.speedup)
    grouped = [u.name for u in analysis.units if u.name in plan.layers and u.group > 1]
    if grouped and opts.objective == "flops":
        analysis.run.warn(f"{len(grouped)} grouped conv(s) decomposed per group ({grouped[0]}, ...): onnxruntime's "
                          "CPU grouped convs do little work per call, and with many groups their chains measured "
                          "slower than the original (BENCHMARKS.md); --objective latency times them first")
    return plan


def solve(analysis: Analysis, plan: ArchitecturePlan, opts: Options, cache: dict | None = None,
          schedule=PAPER_SCHEDULE) -> Solved:
    """The replacement chain of every layer the plan decomposes (paper §3.1-3.5, or a baseline);
    ``cache`` and ``schedule`` as for ``layers.solve_layers``."""
    _warn_if_few_samples(opts, analysis.samples, plan.ranks, analysis.units, analysis.run)
    chosen = [u for u in analysis.units if u.name in plan.layers]
    log.info("solving %d layers (%s%s)", len(chosen), opts.method, ", symmetric" if not opts.asymmetric else "")
    if opts.data_free:
        solved = data_free_chains(opts.method, chosen, plan)
    else:
        solved = solve_layers(opts.method, opts.asymmetric, analysis.normalised, chosen, plan, analysis.responses,
                              analysis.stats, analysis.shapes, analysis.collect,
                              analysis.progress.stage("solving", len(chosen)), cache, schedule)
    for key, seconds in solved.timings.items():
        analysis.run.timings[key] = analysis.run.timings.get(key, 0.0) + seconds
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
        warnings=analysis.run.warnings, timings_s=analysis.run.timings, dry_run=opts.dry_run,
        symmetric=not opts.asymmetric,
        asymmetric_collection_passes=(solved.prefix_macs / total
                                      if (opts.asymmetric or solved.prefix_macs) and not opts.dry_run else None),
        channel_speedup=plan.channel_speedup, options=opts.to_dict(),
        latency_plan=None if plan.predicted_ms is None else {**analysis.latency.describe(),
                                                             "predicted_ms": list(plan.predicted_ms),
                                                             "in_model": plan.in_model},
        files={"input": describe_input(analysis.model_source)}, versions=versions())


def rewrite(analysis: Analysis, solved: Solved, final: bool = False) -> onnx.ModelProto:
    """The model with the solved chains in place, checked. ``final``: nothing else will be built
    from the analysis, so its graph and weights are let go before the measurements."""
    with analysis.run.stage("rewrite", "rewriting the graph", logging.INFO if final else logging.DEBUG):
        optimized = replace_units(analysis.normalised, solved.chains)
        if final:  # only the sessions below hold weights from here on: a large model's go to disk too
            analysis.units, analysis.responses = [], {}
        if analysis.store is not None:
            optimized = analysis.store.keep(optimized)
        gc.collect()  # graphsurgeon graphs are reference cycles that hold the factors' arrays
        _check_rewritten(optimized)
    return optimized


def measure(analysis: Analysis, optimized: onnx.ModelProto, report: Report, opts: Options) -> None:
    """Fidelity on the held-out set and, with ``bench``, latency original vs optimized."""
    data, run = analysis.data, analysis.run
    if len(data.holdout_indices) < FEW_HELD_OUT:
        run.warn(f"fidelity is measured on only {len(data.holdout_indices)} held-out samples: its figures are "
                 f"rough (aim for {FEW_HELD_OUT} or more: more calibration data, or --eval)")
    with run.stage("fidelity", f"measuring fidelity on {len(data.holdout_indices)} held-out samples"):
        report.fidelity = measure_fidelity(analysis.reference, optimized, data.eval_source, data.holdout_indices,
                                           data.batch, labels=getattr(data.eval_source, "labels", None),
                                           threads=opts.threads)
    if opts.bench:
        with run.stage("benchmark", "measuring latency, original vs optimized"):
            feeds = analysis.benchmark_feeds(opts.bench_batch)
            report.latency_ms, report.actual_speedup = benchmark_providers(
                analysis.reference, optimized, feeds, opts.providers, threads=opts.threads, rounds=opts.bench_rounds,
                advance=analysis.progress.stage("benchmarking", len(opts.providers)))


@dataclass
class Run:
    """Wall time per stage and the warnings of one run; a warning is logged as it happens."""

    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, key: str, description: str, level: int = logging.INFO):
        log.log(level, "%s", description)
        clock = time.perf_counter()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - clock

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            log.warning(message)
            self.warnings.append(message)


@dataclass
class _Data:
    """Calibration and evaluation sources, the disjoint index sets used from them, the batch size."""

    source: object
    eval_source: object
    calib_indices: list[int]
    holdout_indices: list[int]
    batch: int


def _open_data(calibration, evaluation, preprocess, inputs, opts: Options, run: Run) -> _Data:
    source = open_calibration(calibration, inputs, preprocess=preprocess, random_count=opts.num_images,
                              seed=opts.seed, input_size=opts.input_size, limit=opts.num_images + opts.holdout)
    if calibration is None:
        run.warn(RANDOM_CALIBRATION_WARNING)
    calib_indices, holdout_indices = _split(source, opts, run)
    eval_source = source
    if evaluation is not None:
        eval_source = open_calibration(evaluation, inputs, input_size=opts.input_size, preprocess=preprocess,
                                       limit=opts.num_images + opts.holdout, role="evaluation")
        holdout_indices = list(range(len(eval_source)))
    eval_warnings = getattr(eval_source, "warnings", []) if evaluation is not None else []
    for message in getattr(source, "warnings", []) + eval_warnings:
        run.warn(message)
    if opts.augment:
        if not isinstance(source, ImageFolderSource):
            raise InvalidOptionError("--augment makes views of the pictures of an image folder",
                                     hint="give --calib an image folder, or drop --augment")
        source = AugmentedViews(source, calib_indices, opts.augment, opts.seed)
        calib_indices = list(range(len(source)))
    batch = batch_size_for(inputs, opts.batch_size)
    if batch_size_for(inputs, 0) > 1:  # a fixed batch of B > 1 can only be fed whole batches
        calib_indices, holdout_indices = (_whole_batches(calib_indices, batch),
                                          _whole_batches(holdout_indices, batch))
    return _Data(source, eval_source, calib_indices, holdout_indices, batch)


def _plan(opts: Options, candidates: list[RankCandidate], units: dict[str, Unit],
          stats: dict[str, ResponseStats], fixed: int, channel_only: set[str],
          sensitivity: dict[str, dict[int, float]] | None = None,
          latency: LayerLatency | None = None) -> ArchitecturePlan:
    """The decomposed architecture. Energy selection ranks by the PCA energy of the responses for
    the data-driven methods, by the spectrum of the weights each baseline truncates otherwise;
    before the responses are collected (no ``stats``) the ranks are uniform."""
    if opts.method == "tucker2":
        return tucker2_plan(candidates, fixed, opts.speedup, opts.rank_multiple)
    losses = sensitivity if opts.selection == "sensitivity" else None
    scheme = "spatial" if opts.method == "jaderberg" else "channel"
    spectra = None
    if opts.selection == "energy" and (stats or opts.data_free):
        spectra = ({n: response_spectrum(units[n], s) for n, s in stats.items()} if not opts.data_free else
                   {c.name: padded(weights_spectrum(units[c.name], scheme), c, scheme) for c in candidates})
    if latency is not None and spectra is not None:
        untimed = [c for c in candidates if c.name not in latency.table]
        split = {c.name: padded(weights_spectrum(units[c.name], "spatial"), c, "spatial") for c in candidates
                 if opts.method == "asym3d" and any(form.spatial for form in latency.table.get(c.name, {}))}
        plan = latency_plan([c for c in candidates if c.name in latency.table], spectra, latency.table,
                            latency.fixed_ms, fixed + sum(c.shape.macs for c in untimed), opts.speedup, split)
        plan.skipped.update({c.name: UNTIMED_REASON for c in untimed})
        return plan
    if opts.method == "jaderberg":
        return spatial_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple)
    if opts.method == "asym3d":
        return three_d_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple, opts.channel_speedup,
                            tuple(sorted(channel_only)), losses)
    return channel_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple, losses)


UNTIMED_REASON = "--objective latency times 2-D convs and dense layers only: left whole"
SAMPLES_PER_CHANNEL = 20
FEW_HELD_OUT = 50
NCHWC_BLOCK = 16


def _positions(opts: Options, units: list[Unit], shapes: dict[str, ConvShape], images: int) -> dict[str, int]:
    """Positions sampled per image for each decomposable conv's output: --samples-per-image for all,
    or sized per layer for its width (``sampling.positions_per_image``)."""
    layers = {u.output: ResponseShape(shapes[u.name].out_channels, shapes[u.name].positions)
              for u in units if u.decomposable}
    if opts.samples_per_image is not None:
        return {name: opts.samples_per_image for name in layers}
    return positions_per_image(layers, max(1, images), opts.sample_memory_mb * 2**20)


def _warn_if_few_samples(opts: Options, samples: dict[str, int], ranks, units, run: Run) -> None:
    """The nonlinear and asymmetric fits regress d outputs on d inputs; with few samples per channel
    they fit the calibration set better than new inputs (measured on CRAFT: BENCHMARKS.md). Even
    PCA sees at most as many directions as it has samples (a dense head gets one per image), and
    rank selection takes the rest for empty. Told for the layer with the fewest per channel."""
    decomposed = [u for u in units if u.name in ranks and u.name in samples]
    if not decomposed:
        return
    worst = min(decomposed, key=lambda u: samples[u.name] / u.weight.shape[0])
    count, channels = samples[worst.name], worst.weight.shape[0]
    if opts.method == "linear" and count < channels:
        run.warn(f"{count} response samples for {channels} channels ({worst.name}): its PCA sees at most {count} "
                 "directions, and rank selection takes the rest for empty; give more calibration data")
    elif opts.method != "linear" and count < SAMPLES_PER_CHANNEL * channels:
        run.warn(f"{count} response samples for {channels} channels ({worst.name}): "
                 f"the {opts.method} fit may not generalise; aim for {SAMPLES_PER_CHANNEL} samples per "
                 "channel (more calibration images; a larger --sample-memory or --samples-per-image if set)")


def _split(source, opts: Options, run: Run) -> tuple[list[int], list[int]]:
    """Calibration and held-out index sets, disjoint by source: the held-out part of an image folder
    is files drawn with the seed (a file is one picture); of arrays and readers, the contiguous block
    at the end, since views made of one picture (crops, flips) usually sit next to each other there
    and random rows would put them on both sides."""
    count = len(source)
    if count == 1:
        run.warn("only one calibration sample: fidelity is measured on the sample used to calibrate")
        return [0], [0]
    held = min(opts.holdout, max(1, count // 5))
    rng = np.random.default_rng(opts.seed)
    if getattr(source, "views_together", False):
        holdout, pool = list(range(count - held, count)), rng.permutation(count - held).tolist()
    else:
        order = rng.permutation(count).tolist()
        holdout, pool = order[:held], order[held:]
    return sorted(pool[:opts.num_images]), sorted(holdout)


def _whole_batches(indices: list[int], batch: int) -> list[int]:
    if len(indices) < batch:
        raise CalibrationError(f"the model takes a fixed batch of {batch}, but only {len(indices)} "
                               "samples are left for this step", hint="give more calibration samples")
    return indices[:len(indices) // batch * batch]


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
        samples=samples)


def _check_rewritten(model: onnx.ModelProto) -> None:
    try:
        check_model(model)
        make_session(model, optimize=False)
    except Exception as exc:
        raise InternalError(f"the rewritten model does not load: {exc}") from None
