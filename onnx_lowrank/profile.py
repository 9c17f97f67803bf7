"""Measured latency of every candidate form of every decomposable layer, on the user's provider:
the cost model of ``--objective latency``.

Each layer is timed in isolation, with its real input shape, as a one-layer model per candidate:
the original conv, and the channel decomposition (k x k, c -> r) then (1 x 1, r -> d) at each
rank of its ladder. A layer's candidates are timed interleaved in one process (medians), so a
drift in machine load hits them alike. Weights are random: latency does not depend on values.

Measurements are kept by (layer shape, candidate, provider, threads, batch, onnxruntime version,
CPU) in memory and, when the user names one, in a JSON cache file, so a second run is fast.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_lowrank.costs import ConvShape
from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.evaluate import interleaved_times
from onnx_lowrank.graph.io import first_line
from onnx_lowrank.graph.rewrite import channel_chain, replace_units, whole_layer
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.ranks import rank_ladder
from onnx_lowrank.runtime import batch_size_for, provider_available

log = logging.getLogger(__name__)

WHOLE = 0  # the candidate "leave the layer as it is", among ranks
PROFILE_ROUNDS = 15
CACHE_VERSION = 1


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
    if provider == "cpu":
        block = nchwc_block()
        return block, (f"NCHWc block {block} ({'AVX-512' if block == 16 else 'AVX2'})" if block
                       else "no NCHWc kernels (neither AVX2 nor AVX-512)")
    return 8, "tensor-core multiple of 8"


@dataclass
class LatencyCache:
    """Measured medians (ms) by key; read from and written back to ``path`` when one is given."""

    path: Path | None = None
    entries: dict[str, float] = field(default_factory=dict)
    hits: int = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> "LatencyCache":
        cache = cls(Path(path) if path is not None else None)
        if cache.path is not None and cache.path.exists():
            try:
                data = json.loads(cache.path.read_text())
                if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                    cache.entries = {str(k): float(v) for k, v in dict(data.get("entries", {})).items()}
                elif not isinstance(data, dict) or "version" not in data:
                    raise ValueError("no 'version' key")
            except (OSError, ValueError, TypeError) as exc:
                raise InvalidOptionError(f"--latency-cache {cache.path} is not a latency cache: {first_line(exc)}",
                                         hint="give a new file name, or delete that file") from None
        return cache

    def save(self) -> None:
        """Written whole and renamed into place, so a reader never sees half a file."""
        if self.path is None:
            return
        folder = self.path.parent
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump({"version": CACHE_VERSION, "entries": self.entries}, stream, indent=0, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class Device:
    """Where latency is measured: provider, intra-op threads (0: onnxruntime's default), batch."""

    provider: str = "cpu"
    threads: int = 0
    batch: int = 1

    def key(self) -> str:
        return f"{self.provider}|t{self.threads}|b{self.batch}|ort{ort.__version__}|{cpu_name()}"


def profile_layers(units: Sequence[Unit], shapes: dict[str, ConvShape], ladders: dict[str, list[int]],
                   device: Device, cache: LatencyCache, rounds: int = PROFILE_ROUNDS) -> dict[str, dict[int, float]]:
    """``latency[layer][rank]`` in ms (``WHOLE`` for the original) for every unit in ``ladders``."""
    table: dict[str, dict[int, float]] = {}
    for unit in units:
        if unit.name not in ladders:
            continue
        shape = shapes[unit.name]
        keys = {rank: f"{device.key()}|{_layer_key(unit, shape)}|r{rank}" for rank in [WHOLE, *ladders[unit.name]]}
        missing = [rank for rank, key in keys.items() if key not in cache.entries]
        cache.hits += len(keys) - len(missing)
        if missing:
            models = [layer_model(unit, shape, rank, device.batch) for rank in missing]
            feeds = {"x": np.random.default_rng(0).standard_normal(_input_shape(unit, shape, device.batch)
                                                                  ).astype(np.float32)}
            times = interleaved_times(models, feeds, provider=device.provider, threads=device.threads, rounds=rounds)
            for rank, measured in zip(missing, times):
                cache.entries[keys[rank]] = float(np.median(measured))
        table[unit.name] = {rank: cache.entries[key] for rank, key in keys.items()}
        log.debug("latency of %s: %s", unit.name, table[unit.name])
    return table


def timed_kind(unit: Unit) -> bool:
    """Layers whose forms are timed: 2-D convs and dense layers (the others stay whole in a latency plan)."""
    return unit.kind == "dense" or unit.kind == "conv" and len(unit.kernel) == 2


def _input_shape(unit: Unit, shape: ConvShape, batch: int) -> list[int]:
    if unit.kind == "dense":
        return [batch, shape.positions, shape.in_channels]
    return [batch, shape.in_channels, *(shape.in_hw or shape.out_hw)]


def layer_model(unit: Unit, shape: ConvShape, rank: int, batch: int) -> onnx.ModelProto:
    """The layer alone on an input of its real shape: the original (``rank == WHOLE``) or its
    channel decomposition at ``rank``, with random weights of the layer's shape."""
    rng = np.random.default_rng(0)
    layer = replace(unit, weight=rng.standard_normal(unit.weight_shape).astype(np.float32),
                    bias=rng.standard_normal(shape.out_channels).astype(np.float32), bias_after=None)
    placeholder = helper.make_node("Identity", ["x"], ["y"], name="layer")  # replaced by the form timed
    graph = helper.make_graph([placeholder], "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, _input_shape(unit, shape, batch))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if rank == WHOLE:
        return replace_units(model, {"layer": whole_layer(layer)})
    basis = np.linalg.qr(rng.standard_normal((shape.out_channels, rank)))[0]
    return replace_units(model, {"layer": channel_chain(layer, basis, basis, np.zeros(shape.out_channels))})


def _layer_key(unit: Unit, shape: ConvShape) -> str:
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(unit.attrs.items())}
    return f"{list(unit.weight_shape)}|{list(shape.in_hw or shape.out_hw)}|{json.dumps(attrs, sort_keys=True)}"



@dataclass
class LayerLatency:
    """The profile a latency plan is made from, and where and how it was measured."""

    table: dict[str, dict[int, float]]
    fixed_ms: float  # the convs no plan changes, measured whole
    device: Device
    grid: str
    measured: int
    cache_hits: int

    def describe(self) -> dict:
        return {"provider": self.device.provider, "threads": self.device.threads, "batch": self.device.batch,
                "grid": self.grid, "candidates_measured": self.measured, "cache_hits": self.cache_hits,
                "onnxruntime": ort.__version__, "cpu": cpu_name()}


def measure_layer_latency(analysis, opts) -> LayerLatency:
    """Profile every decomposable layer's candidates (and the other convs whole) for ``opts``."""
    available = [p for p in opts.providers if provider_available(p)]
    if not available:
        raise InvalidOptionError(f"--objective latency measures on a provider, and none of "
                                 f"{', '.join(opts.providers)} is available here", hint="add --providers cpu")
    device = Device(available[0], opts.threads, batch_size_for(analysis.inputs, opts.bench_batch))
    candidates = {c.name: c for c in analysis.candidates}
    ladders = {u.name: rank_ladder(candidates[u.name], opts.rank_multiple) if u.name in candidates else []
               for u in analysis.units if u.name in analysis.shapes and timed_kind(u) and u.weight_shape}
    cache = LatencyCache.open(opts.latency_cache)
    forms = sum(len(ladder) + 1 for ladder in ladders.values())
    with analysis.run.stage("profile", f"timing {forms} layer candidates "
                                       f"on {device.provider}"):
        table = profile_layers(analysis.units, analysis.shapes, ladders, device, cache)
    cache.save()
    fixed = sum(ms[WHOLE] for name, ms in table.items() if name not in candidates)
    block, grid = rank_grid(device.provider)
    if block and opts.rank_multiple % block:
        analysis.run.warn(f"--rank-multiple {opts.rank_multiple} is off the {grid} grid: the measured latency "
                          "plan avoids the slow ranks, a multiple of the block would give it more to choose from")
    measured = forms - cache.hits
    return LayerLatency({n: t for n, t in table.items() if n in candidates}, fixed, device, grid, measured,
                        cache.hits)
