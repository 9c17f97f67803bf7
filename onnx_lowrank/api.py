"""The library API: ``compress(model, speedup=...)`` runs the whole pipeline and returns a Result.

load -> normalise (fold BN) -> find convs -> calibration -> shapes and FLOPs -> ranks -> collect
responses -> solve -> rewrite -> check -> fidelity and latency. The CLI is a thin layer over this.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from onnx_lowrank.calibration import Preprocess, model_inputs, open_calibration
from onnx_lowrank.costs import ConvShape, max_rank
from onnx_lowrank.errors import CalibrationError, InvalidOptionError, LowRankError, NothingToDecomposeError
from onnx_lowrank.evaluate import measure_fidelity, measure_latency
from onnx_lowrank.graph.io import load_model
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.rewrite import (ConvSpec, channel_decomposition, replace_convs, spatial_decomposition,
                                        tucker2_decomposition)
from onnx_lowrank.graph.units import ConvUnit, find_conv_units
from onnx_lowrank.graph.dense import dense_ops
from onnx_lowrank.graph.surgery import prefix_model
from onnx_lowrank.plans import ArchitecturePlan, channel_plan, spatial_plan, three_d_plan, tucker2_plan
from onnx_lowrank.ranks import RankCandidate, validate_multiple, validate_speedup
from onnx_lowrank.report import LayerReport, Report
from onnx_lowrank.runtime import (PROVIDER_NAMES, batch_size_for, collect_responses, make_session,
                                  probe_shapes, provider_available)
from onnx_lowrank.solvers import LowRankFactors, ResponseStats, fit_pca
from onnx_lowrank.solvers.activations import apply_activation, relative_error
from onnx_lowrank.solvers.nonlinear import fit_nonlinear
from onnx_lowrank.solvers.weights import spatial_filter_reconstruction, tucker2, weight_spectrum, weight_svd

DATA_FREE_METHODS = ("jaderberg", "svd", "tucker2")
METHODS = ("linear", "nonlinear", "asymmetric", "asym3d") + DATA_FREE_METHODS
ASYMMETRIC_METHODS = ("asymmetric", "asym3d")
RANK_SELECTIONS = ("energy", "uniform")
RANDOM_CALIBRATION_WARNING = ("no calibration data given: using random inputs. The responses of random "
                              "inputs say little about real ones, so expect a poor model; pass --calib")


class NullProgress:
    """Progress sink that shows nothing; the CLI passes one backed by rich."""

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        return lambda advance=1: None


@dataclass
class Result:
    """The optimized model (None for a dry run) and the report of what was done and measured."""

    model: onnx.ModelProto | None
    report: Report


@dataclass(frozen=True)
class Options:
    speedup: float
    method: str = "asymmetric"
    symmetric: bool = False
    rank_selection: str | None = None  # None: energy for the data-driven methods, uniform for the baselines
    channel_speedup: float | None = None  # asym3d: None = sqrt(speedup)
    channel_only: tuple[str, ...] = ()
    rank_multiple: int = 16
    num_images: int = 300
    holdout: int = 100
    samples_per_image: int = 32
    seed: int = 0
    skip: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0
    bench: bool = True
    bench_rounds: int = 30
    batch_size: int = 8
    dry_run: bool = False
    input_size: tuple[int, int] | None = None

    def validated(self) -> "Options":
        validate_speedup(self.speedup)
        validate_multiple(self.rank_multiple)
        _choice("method", self.method, METHODS)
        if self.rank_selection is not None:
            _choice("rank selection", self.rank_selection, RANK_SELECTIONS)
        if self.method == "tucker2" and self.rank_selection == "energy":
            raise InvalidOptionError("Tucker-2 has two ranks per layer; only uniform rank selection is built for it",
                                     hint="drop the energy rank selection for --method tucker2")
        if self.symmetric and self.method not in ASYMMETRIC_METHODS:
            raise InvalidOptionError(f"--symmetric changes the asymmetric methods; --method {self.method} "
                                     "is not one", hint="drop --symmetric, or use --method asymmetric or asym3d")
        if self.method != "asym3d" and (self.channel_speedup is not None or self.channel_only):
            raise InvalidOptionError(f"--channel-speedup and --channel-only shape the 3d decomposition, not "
                                     f"--method {self.method}", hint="use them with --method asym3d")
        if self.channel_speedup is not None:
            validate_speedup(self.channel_speedup)
        for provider in self.providers:
            _choice("provider", provider, tuple(PROVIDER_NAMES))
        for name, value in (("num_images", self.num_images), ("samples_per_image", self.samples_per_image),
                            ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if self.threads < 0:
            raise InvalidOptionError(f"threads must be >= 0 (0 = onnxruntime's default), got {self.threads}")
        return self

    @property
    def data_free(self) -> bool:
        return self.method in DATA_FREE_METHODS

    @property
    def selection(self) -> str:
        return self.rank_selection or ("uniform" if self.data_free else "energy")


def _choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InvalidOptionError(f"unknown {what} {value!r}", hint=f"choose one of {', '.join(allowed)}")


def compress(model: str | os.PathLike | onnx.ModelProto, speedup: float = 4.0, *,
             calibration=None, preprocess: Preprocess | None = None, evaluation=None,
             progress=None, **options) -> Result:
    """Make ``model`` about ``speedup`` times cheaper in conv FLOPs by low-rank decomposition.

    ``calibration`` is an image folder, a .npy/.npz path, ``file.py:ReaderName``, an object with
    ``get_next()``, or None (random inputs: a warning, and a poor result). ``evaluation`` is
    optional labelled data (.npz with a ``labels`` array) to measure fidelity on instead of the
    held-out part of the calibration data. Other keywords are the fields of :class:`Options`.
    """
    opts = Options(speedup=speedup, **options).validated()
    progress = progress or NullProgress()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    original = load_model(model)
    normalised = normalise(original)
    units = find_conv_units(normalised)
    _apply_user_skips(units, opts.skip)
    _check_names(units, opts.channel_only, "--channel-only")
    if not any(u.decomposable for u in units):
        reasons = sorted({u.skipped_reason for u in units}) or ["the model has no Conv"]
        raise NothingToDecomposeError("the model has no decomposable conv (" + "; ".join(reasons) + ")",
                                      hint="onnx-lowrank decomposes 2-D convs with constant weights and group=1")

    inputs = model_inputs(normalised)
    source = open_calibration(calibration, inputs, preprocess=preprocess, random_count=opts.num_images,
                              seed=opts.seed, input_size=opts.input_size)
    warnings = [RANDOM_CALIBRATION_WARNING] if calibration is None else []
    calib_indices, holdout_indices = _split(len(source), opts, warnings)
    eval_source = source
    if evaluation is not None:
        eval_source = open_calibration(evaluation, inputs, input_size=opts.input_size, preprocess=preprocess)
        holdout_indices = list(range(len(eval_source)))
    batch = batch_size_for(inputs, opts.batch_size)
    if batch_size_for(inputs, 0) > 1:  # a fixed batch of B > 1 can only be fed whole batches
        calib_indices, holdout_indices = (_whole_batches(calib_indices, batch),
                                          _whole_batches(holdout_indices, batch))

    shapes, dense_total = _measure_shapes(normalised, source, units, inputs, opts.threads)
    conv_macs_before = sum(s.macs for s in shapes.values())
    candidates = [RankCandidate(u.name, shapes[u.name]) for u in units if u.decomposable]
    fixed = conv_macs_before - sum(c.shape.macs for c in candidates)
    timings["analyse"] = time.perf_counter() - clock

    collect = dict(source=source, indices=calib_indices, samples_per_image=opts.samples_per_image,
                   seed=opts.seed, batch_size=batch, threads=opts.threads)
    by_name = {u.name: u for u in units}
    stats, responses = {}, {}
    if not opts.data_free and (not opts.dry_run or opts.selection == "energy"):
        clock = time.perf_counter()
        decomposable = [u for u in units if u.decomposable]
        responses = collect_responses(normalised, tensors=[u.output for u in decomposable],
                                      progress=progress.stage("collecting responses", len(calib_indices)),
                                      **collect)
        stats = {u.name: ResponseStats.from_responses(responses[u.output]) for u in decomposable}
        timings["collect"] = time.perf_counter() - clock
    plan = _plan(opts, candidates, by_name, stats, fixed)

    asymmetric = opts.method in ASYMMETRIC_METHODS and not opts.symmetric
    _warn_if_few_samples(opts, responses, plan.ranks, units, warnings)
    if opts.rank_multiple % NCHWC_BLOCK:
        warnings.append(f"--rank-multiple {opts.rank_multiple} is not a multiple of {NCHWC_BLOCK}: onnxruntime's CPU "
                        "NCHWc kernels only take a conv whose input channels are a multiple of their block (16 with "
                        "AVX-512, 8 with AVX2), so off-grid ranks run as slower NCHW convs with reorders")
    solved = _Solved()
    if not opts.dry_run:
        chosen = [u for u in units if u.name in plan.layers]
        if opts.data_free:
            solved = _data_free_chains(opts.method, chosen, plan)
        else:
            solved = _solve_layers(opts.method, asymmetric, normalised, chosen, plan, responses, stats, shapes,
                                   collect, progress.stage("solving", len(chosen)))
        timings.update(solved.timings)

    report = Report(
        speedup_target=opts.speedup, method=opts.method, rank_selection=opts.selection,
        calibration=source.description, calibration_samples=len(calib_indices),
        theoretical_conv_speedup=plan.speedup,
        theoretical_model_speedup=(conv_macs_before + dense_total) / (plan.macs_after + dense_total),
        layers=[_layer_report(u, shapes.get(u.name), plan, stats, solved) for u in units],
        warnings=warnings, timings_s=timings, dry_run=opts.dry_run, symmetric=not asymmetric,
        asymmetric_collection_passes=(solved.prefix_macs / conv_macs_before
                                      if (asymmetric or solved.prefix_macs) and not opts.dry_run else None),
        channel_speedup=_channel_speedup(opts),
    )
    if opts.dry_run:
        return Result(None, report)

    clock = time.perf_counter()
    optimized = replace_convs(normalised, solved.chains)
    _check_rewritten(optimized)
    timings["rewrite"] = time.perf_counter() - clock
    clock = time.perf_counter()
    report.fidelity = measure_fidelity(original, optimized, eval_source, holdout_indices, batch,
                                       labels=getattr(eval_source, "labels", None), threads=opts.threads)
    timings["fidelity"] = time.perf_counter() - clock
    if opts.bench:
        clock = time.perf_counter()
        feeds = eval_source.get(holdout_indices[:1] * batch_size_for(inputs, 1))
        _benchmark(report, original, optimized, feeds, opts, progress)
        timings["benchmark"] = time.perf_counter() - clock
    return Result(optimized, report)


def _plan(opts: Options, candidates: list[RankCandidate], units: dict[str, ConvUnit],
          stats: dict[str, ResponseStats], fixed: int) -> ArchitecturePlan:
    """The decomposed architecture. Energy selection ranks by the PCA energy of the responses for
    the data-driven methods, by the spectrum of the weights each baseline truncates otherwise."""
    if opts.method == "tucker2":
        return tucker2_plan(candidates, fixed, opts.speedup, opts.rank_multiple)
    scheme = "spatial" if opts.method == "jaderberg" else "channel"
    spectra = None
    if opts.selection == "energy":
        spectra = ({n: s.eigenvalues for n, s in stats.items()} if not opts.data_free else
                   {c.name: _padded(weight_spectrum(units[c.name].weight, scheme), c, scheme) for c in candidates})
    if opts.method == "jaderberg":
        return spatial_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple)
    if opts.method == "asym3d":
        return three_d_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple, opts.channel_speedup,
                            opts.channel_only)
    return channel_plan(candidates, spectra, fixed, opts.speedup, opts.rank_multiple)


def _padded(spectrum: np.ndarray, candidate: RankCandidate, scheme: str) -> np.ndarray:
    """A spectrum of the candidate's full rank: directions the weights do not span have energy 0."""
    full = max_rank(candidate.shape, scheme)
    return np.concatenate([spectrum, np.zeros(max(0, full - len(spectrum)))])[:full]


def _channel_speedup(opts: Options) -> float | None:
    if opts.method != "asym3d":
        return None
    return opts.channel_speedup or float(np.sqrt(opts.speedup))


@dataclass
class _Solved:
    """What solving the chosen layers produced, per layer name."""

    chains: dict[str, list[ConvSpec]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, list[int] | None] = field(default_factory=dict)
    prefix_macs: int = 0  # conv MACs per sample of the sub-graphs re-run for Eq. 12
    timings: dict[str, float] = field(default_factory=dict)


def _data_free_chains(method: str, chosen: list[ConvUnit], plan: ArchitecturePlan) -> _Solved:
    """The baselines: each layer's chain from its weights alone."""
    solved = _Solved()
    clock = time.perf_counter()
    for unit in chosen:
        if method == "svd":
            factors = weight_svd(unit.weight, unit.bias, plan.ranks[unit.name])
            chain = channel_decomposition(unit.attrs, unit.weight, unit.bias, factors.P, factors.Q, factors.bias)
        elif method == "jaderberg":
            chain = _spatial_pair(unit, plan.spatial_ranks[unit.name])
        else:
            chain = tucker2_decomposition(unit.attrs, *tucker2(unit.weight, plan.input_ranks[unit.name],
                                                              plan.ranks[unit.name]), unit.bias)
        solved.chains[unit.name] = chain
    solved.timings["solve"] = time.perf_counter() - clock
    return solved


def _spatial_pair(unit: ConvUnit, rank: int) -> list[ConvSpec]:
    """The layer's (k x 1, rank) -> (1 x k, d) filter reconstruction, bias on the second conv."""
    return spatial_decomposition(unit.attrs, *spatial_filter_reconstruction(unit.weight, rank), unit.bias)


def _solve_layers(method, asymmetric, normalised, chosen, plan: ArchitecturePlan, responses, stats, shapes,
                  collect, advance) -> _Solved:
    """Solve the chosen layers shallow to deep. The fitted input ``W x-hat`` is the output of the
    layer in a network where (with ``asymmetric``, Eq. 12) the earlier layers are already replaced
    and (for a 3d layer, §3.5) the layer itself is split spatially; the target is always the
    original network's response. Only the sub-graph up to the layer is re-run, and only when
    something in it is replaced."""
    solved = _Solved(timings={"collect_asymmetric": 0.0, "solve": 0.0})
    for unit in chosen:
        y = responses.pop(unit.output)
        y_hat = y
        spatial = _spatial_pair(unit, plan.spatial_ranks[unit.name]) if unit.name in plan.spatial_ranks else None
        if asymmetric or spatial is not None:
            clock = time.perf_counter()
            prefix = prefix_model(normalised, [unit.output])
            replaced = {n.name: solved.chains[n.name] for n in prefix.graph.node
                        if asymmetric and n.name in solved.chains}
            if spatial is not None:
                replaced[unit.name] = spatial
            if replaced:
                solved.prefix_macs += sum(shapes[n.name].macs for n in prefix.graph.node if n.name in shapes)
                y_hat = collect_responses(replace_convs(prefix, replaced), tensors=[unit.output],
                                          **collect)[unit.output]
            solved.timings["collect_asymmetric"] += time.perf_counter() - clock
        clock = time.perf_counter()
        factors, solved.iterations[unit.name] = _solve(method, unit, stats[unit.name], y_hat, y, plan.ranks[unit.name])
        act = unit.activation
        solved.errors[unit.name] = relative_error(apply_activation(act.kind, act.params, y),
                                                  apply_activation(act.kind, act.params, factors.apply(y_hat)))
        if spatial is None:
            solved.chains[unit.name] = channel_decomposition(unit.attrs, unit.weight, unit.bias,
                                                             factors.P, factors.Q, factors.bias)
        else:
            vertical, horizontal = spatial
            solved.chains[unit.name] = [vertical] + channel_decomposition(
                horizontal.attrs, horizontal.weight, horizontal.bias, factors.P, factors.Q, factors.bias)
        solved.timings["solve"] += time.perf_counter() - clock
        advance(1)
    return solved


def _solve(method: str, unit: ConvUnit, stats: ResponseStats, y_hat: np.ndarray, y: np.ndarray,
           rank: int) -> tuple[LowRankFactors, list[int] | None]:
    """PCA (Eq. 4) for ``linear``; the alternating solver of Eq. 6 for the layer's activation
    otherwise, asymmetric (Eq. 12) when ``y_hat`` differs from ``y``. Also returns the solver's
    iterations per stage (None for PCA)."""
    if method == "linear":
        return fit_pca(stats, rank), None
    act = unit.activation
    fit = fit_nonlinear(y_hat, y, rank, act.kind, act.params)
    return fit.factors, fit.iterations


def _apply_user_skips(units: list[ConvUnit], skip: Sequence[str]) -> None:
    _check_names(units, skip, "--skip")
    for unit in units:
        if unit.name in skip and unit.decomposable:
            unit.skipped_reason = "skipped by --skip"


def _check_names(units: list[ConvUnit], names: Sequence[str], option: str) -> None:
    known = {u.name for u in units}
    unknown = [s for s in names if s not in known]
    if unknown:
        raise InvalidOptionError(f"{option} names no conv in the model: {', '.join(unknown)}",
                                 hint="the report lists the conv names; --dry-run prints them")


SAMPLES_PER_CHANNEL = 20
NCHWC_BLOCK = 16


def _warn_if_few_samples(opts: Options, responses, ranks, units, warnings: list[str]) -> None:
    """The nonlinear and asymmetric fits regress d outputs on d inputs; with few samples per channel
    they fit the calibration set better than new inputs (measured on CRAFT: BENCHMARKS.md)."""
    if opts.method == "linear" or not responses:
        return
    widest = max((u for u in units if u.name in ranks), key=lambda u: u.weight_shape[0], default=None)
    if widest is None:
        return
    count = len(responses[widest.output])
    if count < SAMPLES_PER_CHANNEL * widest.weight_shape[0]:
        warnings.append(f"{count} response samples for {widest.weight_shape[0]} channels ({widest.name}): "
                        f"the {opts.method} fit may not generalise; aim for {SAMPLES_PER_CHANNEL} samples per "
                        "channel (more calibration images, or --samples-per-image)")


def _split(count: int, opts: Options, warnings: list[str]) -> tuple[list[int], list[int]]:
    """Disjoint calibration and held-out index sets, drawn with the seed."""
    order = np.random.default_rng(opts.seed).permutation(count).tolist()
    if count == 1:
        warnings.append("only one calibration sample: fidelity is measured on the sample used to calibrate")
        return order, order
    held = min(opts.holdout, max(1, count // 5))
    calib = order[held:][:opts.num_images]
    return sorted(calib), sorted(order[:held])


def _whole_batches(indices: list[int], batch: int) -> list[int]:
    if len(indices) < batch:
        raise CalibrationError(f"the model takes a fixed batch of {batch}, but only {len(indices)} "
                               "samples are left for this step", hint="give more calibration samples")
    return indices[:len(indices) // batch * batch]


def _measure_shapes(model, source, units, inputs, threads) -> tuple[dict[str, ConvShape], int]:
    """Per-sample ConvShape of every conv, and the MACs of the dense layers, from one probe run."""
    dense = dense_ops(model)
    probe_batch = batch_size_for(inputs, 1)
    shapes = probe_shapes(model, source, [u.output for u in units] + [u.input for u in units]
                          + [name for name, _ in dense], probe_batch, threads)
    convs = {}
    for unit in units:
        out, inp = shapes[unit.output], shapes[unit.input]
        kernel, spatial, in_spatial = unit.kernel, out[2:], inp[2:]
        if len(kernel) != 2:
            kernel, spatial, in_spatial = (int(np.prod(kernel)), 1), (int(np.prod(spatial)), 1), None
        in_channels = unit.weight_shape[1] * unit.group if len(unit.weight_shape) > 1 else 0
        convs[unit.name] = ConvShape(in_channels, int(out[1]), tuple(kernel), tuple(spatial), unit.group,
                                     tuple(in_spatial) if in_spatial else None)
    dense_total = sum(int(np.prod(shapes[name])) * inner for name, inner in dense) // probe_batch
    return convs, dense_total


def _layer_report(unit: ConvUnit, shape: ConvShape | None, plan: ArchitecturePlan, stats,
                  solved: _Solved) -> LayerReport:
    before = shape.macs if shape else 0
    decomposed = unit.name in plan.layers
    return LayerReport(
        name=unit.name, kernel=list(unit.kernel), in_channels=shape.in_channels if shape else 0,
        out_channels=shape.out_channels if shape else 0, activation=unit.activation.kind,
        rank=plan.ranks.get(unit.name), spatial_rank=plan.spatial_ranks.get(unit.name),
        input_rank=plan.input_ranks.get(unit.name), flops_before=2 * before,
        flops_after=2 * (plan.layer_macs(unit.name, shape) if decomposed else before),
        energy=stats[unit.name].energy(plan.ranks[unit.name]) if unit.name in stats and unit.name in plan.ranks else None,
        response_error=solved.errors.get(unit.name), solver_iterations=solved.iterations.get(unit.name),
        skipped_reason=unit.skipped_reason or plan.skipped.get(unit.name), note=plan.notes.get(unit.name))


def _check_rewritten(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise LowRankError(f"internal error: the rewritten model fails the ONNX checker: {exc}") from None
    make_session(model, optimize=False)


def _benchmark(report: Report, original, optimized, feeds, opts: Options, progress) -> None:
    original_bytes, optimized_bytes = original.SerializeToString(), optimized.SerializeToString()
    advance = progress.stage("benchmarking", len(opts.providers))
    for provider in opts.providers:
        if not provider_available(provider):
            report.latency_ms[provider] = {"original": None, "optimized": None,
                                           "status": "not available (needs onnxruntime-gpu and a CUDA device)"}
            report.actual_speedup[provider] = None
        else:
            latency = measure_latency(original_bytes, optimized_bytes, feeds, provider=provider,
                                      threads=opts.threads, rounds=opts.bench_rounds)
            report.latency_ms[provider] = {"original": latency.original_ms, "optimized": latency.optimized_ms}
            report.actual_speedup[provider] = latency.speedup
        advance(1)
