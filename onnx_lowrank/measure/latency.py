"""The cost model of ``--objective latency``: every form of every layer, timed on the user's provider.

Each layer is timed in isolation, with its real input shape, as a one-layer model per candidate:
the original conv, the channel decomposition (k x k, c -> r) then (1 x 1, r -> d) at each rank of
its ladder and, for 3d (``asym3d``), that chain with its k x k part split. A layer's candidates
are timed interleaved in one process (medians), so a drift in machine load hits them alike;
their weights are random (latency does not depend on values).

Measurements are kept by (layer shape, candidate, provider, threads, batch, onnxruntime version,
CPU) in memory and, when the user names one, in a JSON cache file, so a second run is fast.

Layers timed alone mispredict the model they sit in (inside it, consecutive NCHWc convs skip the
reorders a lone layer pays: plans measured 7-10 % faster than predicted, benchmarks/HISTORY.md), so on
the CPU provider a plan is then timed in the whole model, its linear ops summed by onnxruntime's
profiler, and made again for a target corrected by what was measured (``in_model_plan``).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_lowrank.errors import InfeasibleTargetError, InvalidOptionError
from onnx_lowrank.graph.rewrite import (
    NodeSpec,
    channel_chain,
    channel_decomposition,
    replace_units,
    spatial_decomposition,
    whole_layer,
)
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.measure.context import LayerAnalysis
from onnx_lowrank.measure.fidelity import interleaved_times
from onnx_lowrank.measure.latency_cache import LatencyCache
from onnx_lowrank.options import Options
from onnx_lowrank.planning.costs import ConvShape
from onnx_lowrank.planning.measured import latency_forms
from onnx_lowrank.planning.plans import ArchitecturePlan, has_spatial_extent
from onnx_lowrank.planning.ranks import WHOLE, Form
from onnx_lowrank.registry import PlanFamily
from onnx_lowrank.runtime.sessions import batch_size_for, make_session, provider_available

log = logging.getLogger(__name__)

PROFILE_ROUNDS = 15
IN_MODEL_ROUNDS = 15
IN_MODEL_STEPS = 4  # plans timed in the whole model, the first included
IN_MODEL_TOLERANCE = 0.03  # a plan measuring within this of the target is taken as it is
LINEAR_OPS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nchwc_block() -> int | None:
    """The channel block of onnxruntime's NCHWc CPU kernels on this CPU: 16 with AVX-512, 8 with
    AVX2, None without either (MLAS picks its kernels by these instruction sets)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" in flags:
        return 16
    return 8 if "avx2" in flags else None


def rank_grid(provider: str) -> tuple[int | None, str]:
    """The channel multiple the provider's fastest kernels want, and how it was found."""
    if provider in ("cpu", "openvino"):  # OpenVINO's CPU plugin blocks channels as MLAS does (oneDNN)
        block = nchwc_block()
        layout = "NCHWc block" if provider == "cpu" else "oneDNN blocked layout"
        return block, (f"{layout} {block} ({'AVX-512' if block == 16 else 'AVX2'})" if block
                       else f"no {layout} (neither AVX2 nor AVX-512)")
    return 8, "tensor-core multiple of 8"


@dataclass(frozen=True)
class Device:
    """Where latency is measured: provider, intra-op threads (0: onnxruntime's default), batch."""

    provider: str = "cpu"
    threads: int = 0
    batch: int = 1

    def key(self) -> str:
        return f"{self.provider}|t{self.threads}|b{self.batch}|ort{ort.__version__}|{cpu_name()}"


def profile_layers(units: Sequence[Unit], shapes: dict[str, ConvShape], ladders: dict[str, list[Form]],
                   device: Device, cache: LatencyCache, rounds: int = PROFILE_ROUNDS) -> dict[str, dict[Form, float]]:
    """``latency[layer][form]`` in ms (``WHOLE`` for the original) for every unit in ``ladders``."""
    table: dict[str, dict[Form, float]] = {}
    for unit in units:
        if unit.name not in ladders:
            continue
        shape = shapes[unit.name]
        keys = {form: f"{device.key()}|warm|{_layer_key(unit, shape)}|{_form_key(form)}"
                for form in [WHOLE, *ladders[unit.name]]}
        missing = [form for form, key in keys.items() if key not in cache.entries]
        cache.hits += len(keys) - len(missing)
        if missing:
            models = [layer_model(unit, shape, form, device.batch) for form in missing]
            feeds = {"x": np.random.default_rng(0).standard_normal(_input_shape(unit, shape, device.batch)
                                                                  ).astype(np.float32)}
            times = interleaved_times(models, feeds, provider=device.provider, threads=device.threads, rounds=rounds,
                                      warm=True, produced_from=0)
            for form, measured in zip(missing, times):
                cache.entries[keys[form]] = float(np.median(measured))
        table[unit.name] = {form: cache.entries[key] for form, key in keys.items()}
        log.debug("latency of %s: %s", unit.name, table[unit.name])
    return table


def timed_kind(unit: Unit) -> bool:
    """Layers whose forms are timed: 2-D convs and dense layers (the others stay whole in a latency plan)."""
    return unit.kind == "dense" or unit.kind == "conv" and len(unit.kernel) == 2


def _input_shape(unit: Unit, shape: ConvShape, batch: int) -> list[int]:
    if unit.op == "Gemm":  # a matrix in, one row per sample (and position)
        return [batch * shape.positions, shape.in_channels]
    if unit.kind == "dense":
        return [batch, shape.positions, shape.in_channels]
    return [batch, shape.in_channels, *(shape.in_hw or shape.out_hw)]


def layer_model(unit: Unit, shape: ConvShape, form: Form, batch: int) -> onnx.ModelProto:
    """The layer alone in ``form`` on an input of its real shape, with random weights of the
    layer's shape."""
    rng = np.random.default_rng(0)
    layer = replace(unit, weight=rng.standard_normal(unit.weight_shape).astype(np.float32),
                    bias=rng.standard_normal(shape.out_channels).astype(np.float32), bias_after=None)
    placeholder = helper.make_node("Identity", ["x"], ["y"], name="layer")  # replaced by the form timed
    graph = helper.make_graph([placeholder], "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, _input_shape(unit, shape, batch))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return replace_units(model, {"layer": form_chain(layer, form, rng)})


def form_chain(unit: Unit, form: Form, rng: np.random.Generator) -> list[NodeSpec]:
    """The layer's chain in ``form``, with random factors of the form's shapes: for timing only."""
    if form == WHOLE:
        return whole_layer(unit)
    out_channels = unit.weight.shape[0]
    basis = np.linalg.qr(rng.standard_normal((out_channels, form.rank)))[0]
    if not form.spatial:
        return channel_chain(unit, basis, basis, np.zeros(out_channels))
    (kh, kw), in_channels = unit.kernel, unit.weight.shape[1]
    vertical = rng.standard_normal((form.spatial, in_channels, kh, 1)).astype(np.float32)
    horizontal = rng.standard_normal((out_channels, form.spatial, 1, kw)).astype(np.float32)
    first, second = spatial_decomposition(unit.attrs, vertical, horizontal, unit.bias)
    return [first, *channel_decomposition(second.attrs, second.weight, second.bias, basis, basis,
                                          np.zeros(out_channels))]


def _form_key(form: Form) -> str:
    return f"r{form.rank}" + (f"s{form.spatial}" if form.spatial else "")


def _layer_key(unit: Unit, shape: ConvShape) -> str:
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(unit.attrs.items())}
    return f"{list(unit.weight_shape)}|{list(shape.in_hw or shape.out_hw)}|{json.dumps(attrs, sort_keys=True)}"


@dataclass
class LayerLatency:
    """The profile a latency plan is made from, and where and how it was measured."""

    table: dict[str, dict[Form, float]]
    fixed_ms: float  # the convs no plan changes, measured whole
    device: Device
    grid: str
    measured: int
    cache_hits: int

    def describe(self) -> dict:
        return {"provider": self.device.provider, "threads": self.device.threads, "batch": self.device.batch,
                "in_model_measure": in_model_measure(self.device.provider),
                "grid": self.grid, "candidates_measured": self.measured, "cache_hits": self.cache_hits,
                "onnxruntime": ort.__version__, "cpu": cpu_name()}


def measure_layer_latency(analysis: LayerAnalysis, opts: Options) -> LayerLatency:
    """Profile every decomposable layer's candidates (and the other convs whole) for ``opts``."""
    available = [p for p in opts.providers if provider_available(p)]
    if not available:
        raise InvalidOptionError(f"--objective latency measures on a provider, and none of "
                                 f"{', '.join(opts.providers)} is available here", hint="add --providers cpu")
    if available[0] != opts.providers[0]:
        analysis.run.warn(f"--objective latency plans on {available[0]}: {opts.providers[0]} is not available here")
    device = Device(available[0], opts.threads, batch_size_for(analysis.inputs, opts.bench_batch))
    candidates = {c.name: c for c in analysis.candidates}
    split = {n for n, c in candidates.items() if opts.spec.plan is PlanFamily.THREE_D and has_spatial_extent(c.shape)
             and n not in analysis.channel_only}
    ladders = {u.name: latency_forms(candidates[u.name], opts.rank_multiple, u.name in split)
               if u.name in candidates else []
               for u in analysis.units if u.name in analysis.shapes and timed_kind(u) and u.weight_shape}
    cache = analysis.latency_cache
    forms = sum(len(ladder) + 1 for ladder in ladders.values())
    with analysis.run.stage("profile", f"timing {forms} layer candidates "
                                       f"on {device.provider}"):
        table = profile_layers(analysis.units, analysis.shapes, ladders, device, cache)
    fixed = sum(ms[WHOLE] for name, ms in table.items() if name not in candidates)
    block, grid = rank_grid(device.provider)
    if block and opts.rank_multiple % block:
        analysis.run.warn(f"--rank-multiple {opts.rank_multiple} is off the {grid} grid: the measured latency "
                          "plan avoids the slow ranks, a multiple of the block would give it more to choose from")
    measured = forms - cache.hits
    return LayerLatency({n: t for n, t in table.items() if n in candidates}, fixed, device, grid, measured,
                        cache.hits)


def linear_op_times(models: Sequence[onnx.ModelProto], feeds: dict[str, np.ndarray], device: Device,
                    rounds: int = IN_MODEL_ROUNDS, warmup: int = 3) -> list[np.ndarray]:
    """Per model, the summed kernel time (ms) of its linear ops (convs, Gemm, MatMul) in each run,
    by onnxruntime's profiler, the models run in turn round by round: the conv time a latency plan
    aims at, without the other ops a whole-model latency includes."""
    with tempfile.TemporaryDirectory() as folder:
        sessions = [make_session(m, threads=device.threads, provider=device.provider, produced=i > 0,
                                 profile_prefix=str(Path(folder) / f"model{i}")) for i, m in enumerate(models)]
        for session in sessions:
            for _ in range(warmup):
                session.run(None, feeds)
        for _ in range(rounds):
            for session in sessions:
                session.run(None, feeds)
        per_run = []
        for session in sessions:
            events = json.loads(Path(session.end_profiling()).read_text())
            spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
            kernels = [(e["ts"], e["dur"]) for e in events if e.get("cat") == "Node"
                       and e["name"].endswith("_kernel_time") and e.get("args", {}).get("op_name") in LINEAR_OPS]
            per_run.append(np.array([sum(d for t, d in kernels if start <= t <= end) for start, end in spans]) / 1e3)
    return per_run


def architecture_model(model: onnx.ModelProto, units: Sequence[Unit], plan: ArchitecturePlan) -> onnx.ModelProto:
    """``model`` with the planned chains in place, their factors random: the plan's architecture,
    to be timed before anything is solved."""
    rng = np.random.default_rng(0)
    return replace_units(model, {u.name: form_chain(u, Form(plan.ranks[u.name], plan.spatial_ranks.get(u.name, 0)), rng)
                                 for u in units if u.name in plan.ranks})


def in_model_plan(plan_at: Callable[[float], ArchitecturePlan], conv_speedup: Callable[[ArchitecturePlan], float],
                  speedup: float, steps: int = IN_MODEL_STEPS,
                  tolerance: float = IN_MODEL_TOLERANCE) -> tuple[ArchitecturePlan, list[dict]]:
    """The latency plan for ``speedup``, checked in the whole model: ``conv_speedup(plan)``
    measures it there; while that is off the target by more than ``tolerance``, the plan is made
    again (``plan_at``) for the target corrected by measured / predicted. Of the plans tried, the
    one measuring closest to the target (by ratio): an overshoot costs accuracy the user did not
    ask to spend, and where one measurement moves by ~10 % a plan just under the target can be the
    nearest. A target the layers alone cannot reach is refused only when the fastest plan misses
    it in the model too. Returns the plan and every step (target asked, predicted, measured)."""
    tried: list[tuple[ArchitecturePlan, dict]] = []
    refusals: list[InfeasibleTargetError] = []  # the one that sent the check to the fastest plan

    def planned(target: float) -> tuple[float, ArchitecturePlan]:
        # Layers alone underpredict most models (by a third on CRAFT): past what they reach, the
        # fastest plan is timed in the model, once, before a target is given up.
        try:
            return target, plan_at(target)
        except InfeasibleTargetError as exc:
            if exc.reachable is None or exc.reachable <= 1 or refusals:
                raise
            refusals.append(exc)
            return exc.reachable * (1 - 1e-9), plan_at(exc.reachable * (1 - 1e-9))

    asked, plan = planned(speedup)
    refused = refusals[0] if refusals else None
    for _ in range(steps):
        predicted = plan.predicted_ms[0] / plan.predicted_ms[1]
        measured = conv_speedup(plan)
        if not math.isfinite(measured) or measured <= 0:  # no linear op timed in any run: nothing to correct by
            log.warning("the latency plan for %.3gx could not be timed in the model; kept as planned from its "
                        "layers", asked)
            break
        tried.append((plan, {"asked": asked, "predicted": predicted, "measured": measured}))
        log.info("latency plan for %.3gx: predicted %.3gx, measured %.3gx in the model", asked, predicted, measured)
        if abs(measured / speedup - 1) <= tolerance or (asked := _next_target(speedup, [t for _, t in tried])) <= 1:
            break
        try:
            asked, again = planned(asked)
        except InfeasibleTargetError:
            break
        if (again.ranks, again.spatial_ranks) == (plan.ranks, plan.spatial_ranks):
            break
        plan = again
    if refused is not None and not tried:
        raise refused
    if not tried:
        return plan, []
    if refused is not None and tried[0][1]["measured"] < (1 - tolerance) * speedup:
        raise InfeasibleTargetError(f"a {speedup:.4g}x measured speedup cannot be reached",
                                    hint=f"the fastest plan measures {tried[0][1]['measured']:.3g}x in the model; "
                                         "ask for less", reachable=tried[0][1]["measured"])
    chosen = min(tried, key=lambda t: abs(math.log(t[1]["measured"] / speedup)))[0]
    return chosen, [step for _, step in tried]


def _next_target(speedup: float, steps: list[dict]) -> float:
    """The target to plan for next: the secant (in logs) through the two measured nearest the
    target, the plan that decomposes nothing (1x predicted, 1x measured) among them. The layers
    alone can mispredict a model far from proportionally (OpenVINO on CRAFT: 1.45x predicted
    measured 1.80x, 2.00x measured 3.74x): a power law through 1x follows that where a
    proportional correction does not."""
    points = [(math.log(s["predicted"]), math.log(s["measured"])) for s in steps] + [(0.0, 0.0)]
    (x1, y1), (x2, y2) = sorted(points, key=lambda p: abs(p[1] - math.log(speedup)))[:2]
    if abs(y2 - y1) < 1e-9 or abs(x2 - x1) < 1e-9:  # no slope to follow: the proportional correction
        return speedup * math.exp(x1 - y1)
    return math.exp(x1 + (math.log(speedup) - y1) * (x2 - x1) / (y2 - y1))


def in_model_measure(provider: str) -> str:
    """What the in-model check times on ``provider``: onnxruntime's profiler times each CPU node,
    but sees one fused node on the others (OpenVINO, CUDA, TensorRT), where the whole model's
    latency is what there is to aim at."""
    return "linear ops" if provider == "cpu" else "whole model"


def plan_in_model(analysis: LayerAnalysis, opts: Options, plan_at: Callable[[float], ArchitecturePlan]) -> ArchitecturePlan:
    """``in_model_plan`` on the analysed model, timed by ``in_model_measure`` of its provider."""
    device = analysis.latency.device
    feeds = analysis.measuring().benchmark_feeds(device.batch)

    def conv_speedup(plan: ArchitecturePlan) -> float:  # the median of per-round ratios: a load drift hits both
        models = [analysis.normalised, architecture_model(analysis.normalised, analysis.units, plan)]
        if in_model_measure(device.provider) == "linear ops":
            original, planned = linear_op_times(models, feeds, device)
        else:
            original, planned = interleaved_times(models, feeds, provider=device.provider, threads=device.threads,
                                                  rounds=IN_MODEL_ROUNDS)
        timed = (original > 0) & (planned > 0)  # a run whose kernels fell outside its span says nothing
        return float(np.median(original[timed] / planned[timed])) if timed.any() else math.nan

    with analysis.run.stage("profile-model", f"timing the latency plan in the whole model "
                                             f"({in_model_measure(device.provider)} on {device.provider})"):
        plan, steps = in_model_plan(plan_at, conv_speedup, opts.speedup)
    plan.in_model = steps
    return plan
