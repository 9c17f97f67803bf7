"""The typed contexts a run's stages take: ``Run`` (the clock and the warnings), ``ProgressSink``,
``Measuring`` (what the stages after the rewrite need: fidelity, latency, INT8; the original and
the data split, no layers, no responses) and ``LayerAnalysis`` (what the measurements a plan asks
for read of ``pipeline.analysis.Analysis``: written here so the dependency shows in an import)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import onnx

from onnx_lowrank.runtime.calibration import InputSpec
from onnx_lowrank.runtime.sessions import batch_size_for
from onnx_lowrank.runtime.split import DataSplit

if TYPE_CHECKING:
    from onnx_lowrank.graph.units import Unit
    from onnx_lowrank.measure.latency import LayerLatency
    from onnx_lowrank.measure.latency_cache import LatencyCache
    from onnx_lowrank.planning.costs import ConvShape
    from onnx_lowrank.planning.ranks import RankCandidate
    from onnx_lowrank.solvers import ResponseStats

log = logging.getLogger(__name__)


def peak_memory_mib() -> float | None:
    """The process's peak resident memory so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)  # bytes on macOS, KiB on Linux


class ProgressSink(Protocol):
    """Where a run reports its progress: ``stage(description, total)`` returns ``advance(n=1)``."""

    def stage(self, description: str, total: int) -> Callable[[int], None]: ...


class NullProgress:
    """Progress sink that shows nothing; the CLI passes one that draws bars or logs lines."""

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        return lambda advance=1: None


@dataclass
class Run:
    """Wall time per stage, the process's peak memory at the end of each, and the warnings of one
    run; a warning is logged as it happens."""

    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)  # MiB, the peak so far as a stage ends
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, key: str, description: str, level: int = logging.INFO):
        log.log(level, "%s", description)
        clock = time.perf_counter()
        yield
        self.add_time(key, time.perf_counter() - clock)

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds
        peak = peak_memory_mib()
        if peak is not None:
            self.peak_memory[key] = peak

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            log.warning(message)
            self.warnings.append(message)


@dataclass(frozen=True)
class Measuring:
    """What the stages that measure a finished model read: the original (its file where there is
    one), the normalised original, the model's inputs, the data split, the run and its progress."""

    reference: onnx.ModelProto | Path
    normalised: onnx.ModelProto
    inputs: list[InputSpec]
    data: DataSplit
    run: Run
    progress: ProgressSink

    def benchmark_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """The first held-out sample, repeated to the batch latency is measured at."""
        return self.data.eval_source.get(self.data.holdout_indices[:1] * batch_size_for(self.inputs, batch))


class LayerAnalysis(Protocol):
    """What sensitivity and latency profiling read of a run's analysis: its layers, their shapes,
    responses and statistics, the collection settings, the data split and the run."""

    normalised: onnx.ModelProto
    units: list[Unit]
    channel_only: set[str]
    inputs: list[InputSpec]
    data: DataSplit
    shapes: dict[str, ConvShape]
    candidates: list[RankCandidate]
    collect: dict
    stats: dict[str, ResponseStats]
    responses: dict[str, np.ndarray]
    run: Run
    progress: ProgressSink
    latency: LayerLatency | None
    latency_cache: LatencyCache

    @property
    def by_name(self) -> dict[str, Unit]: ...

    def measuring(self) -> Measuring: ...
