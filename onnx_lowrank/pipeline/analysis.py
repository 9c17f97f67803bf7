"""What a run computes once per model and data, before any plan: the normalised model, its
layers and shapes, the calibration and held-out sets, the sampled responses (``analyse``), and
the run's clock and warnings (``Run``)."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_lowrank.errors import CalibrationError, InvalidOptionError
from onnx_lowrank.graph.io import WeightStore, is_large, load_model, model_path
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.selection import select_units
from onnx_lowrank.graph.surgery import name_nodes_in_place
from onnx_lowrank.graph.units import Unit, find_units
from onnx_lowrank.measure.context import Measuring, NullProgress, ProgressSink, Run
from onnx_lowrank.measure.latency import LayerLatency, nchwc_block
from onnx_lowrank.measure.latency_cache import LatencyCache
from onnx_lowrank.methods.carried import CutSizes
from onnx_lowrank.options import Options
from onnx_lowrank.output.report import Report
from onnx_lowrank.pipeline.plan import _plan
from onnx_lowrank.planning.costs import ConvShape
from onnx_lowrank.planning.ranks import RankCandidate
from onnx_lowrank.planning.sampling import ResponseShape, images_per_batch, positions_per_image
from onnx_lowrank.runtime.calibration import CalibrationSource, model_inputs, open_calibration
from onnx_lowrank.runtime.images import AugmentedViews, ImageFolderSource, Preprocess
from onnx_lowrank.runtime.sessions import batch_size_for, collect_responses, mixed_builds_warning, onnxruntime_builds
from onnx_lowrank.runtime.shapes import measure_shapes
from onnx_lowrank.runtime.split import DataSplit
from onnx_lowrank.solvers import ResponseStats

RANDOM_CALIBRATION_WARNING = ("no calibration data given: using random inputs. The responses of random "
                              "inputs say little about real ones, so expect a poor model; pass --calib")

log = logging.getLogger(__name__)


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
    data: DataSplit
    shapes: dict[str, ConvShape]
    candidates: list[RankCandidate]
    fixed: int
    collect: dict
    stats: dict[str, ResponseStats]
    responses: dict[str, np.ndarray]
    samples: dict[str, int]
    run: Run
    progress: ProgressSink
    sensitivity: dict[str, dict[int, float]] | None = None  # measured once, when a plan asks for it
    latency: LayerLatency | None = None  # --objective latency: measured once
    latency_cache: LatencyCache = field(default_factory=LatencyCache)  # saved by ``finish``, when the run succeeds
    cuts: CutSizes | None = None  # what Eq. 12 may carry from layer to layer (``methods.carried``)

    @property
    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def macs_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for unit in self.units:
            if unit.name in self.shapes:
                kinds[unit.kind] = kinds.get(unit.kind, 0) + self.shapes[unit.name].macs
        return kinds

    def measuring(self) -> Measuring:
        """The context of the stages after the rewrite, which need none of the layers' responses."""
        return Measuring(self.reference, self.normalised, self.inputs, self.data, self.run, self.progress)

    def ending(self) -> "Ending":
        """What the run keeps once its layers and their responses are let go."""
        return Ending(self.measuring(), self.store, self.latency_cache)


def analyse(model, opts: Options, calibration: CalibrationSource = None, evaluation: CalibrationSource = None,
            preprocess: Preprocess | None = None, progress: ProgressSink | None = None,
            fixed_target: bool = True, needs_labels: str | None = None) -> Analysis:
    """Load, normalise, find the convs, open the data, measure shapes and collect the responses.
    With a ``fixed_target`` (not a search) an infeasible speedup is refused before the collection;
    ``needs_labels`` names the option that makes labels necessary, refused without them."""
    progress = progress or NullProgress()
    run = Run()
    latency_cache = LatencyCache.open(opts.latency_cache)  # a file that is not one is refused before any work
    if mixed := mixed_builds_warning(onnxruntime_builds()):
        run.warn(mixed)
    # Bad input shows up here; it is told in one line, without stage lines before it.
    with run.stage("analyse", "loading and analysing the model", logging.DEBUG):
        original, reference = _loaded(model)
        normalised = normalise(original)
        del original
        store = WeightStore() if is_large(normalised) else None
        for asked, flag in ((opts.quantize, "--quantize"), (opts.distill, "--distill")):
            if store is not None and asked:
                raise InvalidOptionError(f"{flag} is not built for models over 2 GiB yet", hint=f"drop {flag}")
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
        shapes, cut_bytes = measure_shapes(normalised, data.source, units, inputs, opts.threads)
    candidates = [RankCandidate(u.name, shapes[u.name], dense=u.kind == "dense") for u in units if u.decomposable]
    fixed = sum(shapes[u.name].macs for u in units
                if u.name in shapes and u.kind in opts.ops and not u.decomposable)
    if fixed_target and opts.objective == "flops":
        _plan(opts, candidates, {u.name: u for u in units}, {}, fixed, channel_only_names)  # fail before the work
    collect = dict(source=data.source, indices=data.calib_indices,
                   samples_per_image=_positions(opts, units, shapes, len(data.calib_indices)),
                   seed=opts.seed, batch_size=_collection_batch(data.batch, inputs, units, shapes, opts),
                   threads=opts.threads,
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
    block = nchwc_block()
    if block and opts.rank_multiple % block:
        run.warn(f"--rank-multiple {opts.rank_multiple} is not a multiple of {block}: onnxruntime's CPU "
                 "NCHWc kernels only take a conv whose input channels are a multiple of their block (16 with "
                 "AVX-512, 8 with AVX2, as on this CPU), so off-grid ranks run as slower NCHW convs with reorders")
    return Analysis(model, reference, normalised, store, units, channel_only_names, inputs, data, shapes,
                    candidates, fixed, collect, stats, responses, samples, run, progress,
                    latency_cache=latency_cache, cuts=CutSizes(cut_bytes, opts.sample_memory_mb * 2**20 // 2))


def _loaded(model) -> tuple[onnx.ModelProto, "onnx.ModelProto | os.PathLike"]:
    """The model, and what sessions of the original read: the user's file where there is one (no
    second copy in memory). A proto of our own is named in place (``graph.surgery``), so that
    normalising it copies nothing where there is nothing to fold (553 MB on VGG-16)."""
    original = load_model(model)
    if not isinstance(model, onnx.ModelProto):
        name_nodes_in_place(original)
    return original, (model_path(model) if isinstance(model, (str, os.PathLike)) else original)


def _open_data(calibration, evaluation, preprocess, inputs, opts: Options, run: Run) -> DataSplit:
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
    return DataSplit(source, eval_source, calib_indices, holdout_indices, batch)


FEW_HELD_OUT = 50




def _positions(opts: Options, units: list[Unit], shapes: dict[str, ConvShape], images: int) -> dict[str, int]:
    """Positions sampled per image for each decomposable conv's output: --samples-per-image for all,
    or sized per layer for its width (``sampling.positions_per_image``)."""

    layers = {u.output: ResponseShape(shapes[u.name].out_channels, shapes[u.name].positions)
              for u in units if u.decomposable}
    if opts.samples_per_image is not None:
        return {name: opts.samples_per_image for name in layers}
    return positions_per_image(layers, max(1, images), opts.sample_memory_mb * 2**20)


def _collection_batch(batch: int, inputs, units: list[Unit], shapes: dict[str, ConvShape], opts: Options) -> int:
    """Images per batch of the collections (responses, Eq. 12's re-collection): their layers'
    outputs at full resolution within an eighth of --sample-memory; a model's fixed batch whole."""
    if batch_size_for(inputs, 0) > 1:
        return batch
    per_image = sum(4 * shapes[u.name].out_channels * shapes[u.name].positions for u in units if u.decomposable)
    return images_per_batch(per_image, batch, opts.sample_memory_mb * 2**17)


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

@dataclass(frozen=True)
class Ending:
    """What a run keeps to its end once the layers are solved and let go: the context it measures
    with, the weight store of a model too large for one protobuf, the latency cache to save."""

    measuring: Measuring
    store: WeightStore | None
    latency_cache: LatencyCache

    def finish(self, optimized: onnx.ModelProto | None, report: Report) -> "Result":
        """The run's result; the measured layer latencies are kept now that it has succeeded."""
        self.latency_cache.save()
        run = self.measuring.run
        run.add_time("total", time.perf_counter() - run.started)
        return Result(optimized, report, self.store)


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
