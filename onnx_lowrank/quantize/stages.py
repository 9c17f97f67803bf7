"""INT8 on top of the low-rank model, in the run: the guard's tolerance, and the stage table a
user weighs (original, low-rank, low-rank + INT8, INT8 alone: fidelity and latency of each).

The default tolerance limits what INT8 adds to the relative output error of the model it
quantizes, measured against the original on the held-out set (worst output): ``--int8-tolerance``,
0.05 by default. A low-rank model at error 0.18 may become 0.23 at most, INT8 alone may reach 0.05;
a model INT8 breaks (a VGG-16 at 0.57) never passes. With an accuracy budget the budget is the
tolerance. Where the guard finds no INT8 model within it, the float low-rank model is written,
with one warning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx

from onnx_lowrank.errors import ProviderError
from onnx_lowrank.measure.context import Measuring
from onnx_lowrank.measure.fidelity import compare_outputs, held_out_outputs, interleaved_times, model_outputs
from onnx_lowrank.quantize.guard import RANKING_SAMPLES, Guarded, Verdict, guard_int8, max_evaluations
from onnx_lowrank.quantize.quantizer import Int8Quantizer, SourceReader
from onnx_lowrank.runtime.sessions import provider_available

log = logging.getLogger(__name__)

Judge = Callable[[dict], "tuple[float, bool]"]  # held-out outputs -> (value, met)


@dataclass(frozen=True)
class Tolerance:
    """What INT8 may cost: ``judge(reference, float_outputs)`` is the held-out test of a model whose
    float version gives ``float_outputs`` where the original gives ``reference``; ``text`` says it."""

    text: str
    judge: Callable[[dict, dict], Judge]

    @classmethod
    def error_added(cls, limit: float) -> "Tolerance":
        return cls(f"INT8 adds at most {limit:g} to the relative output error (worst output, held-out)",
                   lambda reference, floats: error_added(reference, floats, limit))


def error_added(reference: dict, float_outputs: dict, tolerance: float) -> Judge:
    """The default judge: the relative output error INT8 adds to the float model's, against the
    original's outputs ``reference`` (the worst output), at most ``tolerance``."""
    float_errors = compare_outputs(reference, float_outputs).output_rel_error

    def judge(outputs: dict) -> tuple[float, bool]:
        errors = compare_outputs(reference, outputs).output_rel_error
        value = max(errors[name] - float_errors[name] for name in errors)
        return value, bool(value <= tolerance)
    return judge


def int8_of(measuring: Measuring, model: onnx.ModelProto, opts, judge: Judge, restore: bool = True) -> Guarded:
    """``model`` quantized as the run asks, calibrated on the run's calibration samples, with
    the fewest nodes in float that ``judge`` passes on the held-out set (``restore``: searched for;
    otherwise the all-INT8 model, measured)."""
    data = measuring.data

    def accept(candidate: onnx.ModelProto) -> Verdict:
        outputs = held_out_outputs(candidate, data, opts.threads, produced=True)
        value, met = judge(outputs)
        return Verdict(value, met, outputs)

    ranking = _ranking_indices(data.calib_indices, data.batch)
    float_ranking: dict = {}  # the float model's outputs there, computed when a ranking first needs them

    def ranking_error(candidate: onnx.ModelProto) -> float:
        if not float_ranking:
            float_ranking.update(model_outputs(model, data.source, ranking, data.batch, opts.threads))
        outputs = model_outputs(candidate, data.source, ranking, data.batch, opts.threads,
                                produced=True)
        return max(compare_outputs(float_ranking, outputs).output_rel_error.values())

    reader = SourceReader(data.source, data.calib_indices, data.batch)
    with Int8Quantizer(model, reader, opts.int8_calibration, symmetric_activations(opts)) as quantizer:
        return guard_int8(quantizer, accept, ranking_error, restore)


def symmetric_activations(opts) -> bool:
    return opts.providers[0] == "tensorrt"  # TensorRT takes symmetric int8 activations only


def _ranking_indices(indices: list[int], batch: int) -> list[int]:
    """About ``RANKING_SAMPLES`` calibration samples spread over the set, in whole batches."""
    count = max(1, RANKING_SAMPLES // batch) * batch
    step = max(1, len(indices) // count)
    chosen = indices[::step][:count]
    return chosen if len(chosen) % batch == 0 else indices[:batch]


def add_int8(measuring: Measuring, lowrank: onnx.ModelProto, report, opts, lowrank_int8: Guarded | None = None,
             tolerance: Tolerance | None = None) -> onnx.ModelProto:
    """Quantize the low-rank model (``lowrank_int8`` when that is done already) and, for
    comparison, the original; fidelity and latency of every stage go to ``report.stages``, the
    guard's findings to ``report.int8``. ``tolerance``: a budget's, instead of
    ``--int8-tolerance``. Returns what to write: the guarded INT8 model, or
    the float low-rank model where no INT8 model met the tolerance."""
    data, run = measuring.data, measuring.run
    tolerance = tolerance or Tolerance.error_added(opts.int8_tolerance)
    with run.stage("quantize", f"quantizing to INT8 ({opts.int8_calibration} calibration, accuracy-guarded)"):
        expected = held_out_outputs(measuring.reference, data, opts.threads)
        lowrank_outputs = held_out_outputs(lowrank, data, opts.threads, produced=True)
        if lowrank_int8 is None:
            lowrank_int8 = int8_of(measuring, lowrank, opts, tolerance.judge(expected, lowrank_outputs))
        # INT8 alone quantizes the normalised original (the folding is part of what it is compared
        # with), measured but not searched: on CRAFT its search cost more than the rest of the run
        original_int8 = int8_of(measuring, measuring.normalised, opts, tolerance.judge(expected, expected), False)
    labels = data.held_out_labels()
    stages = [_stage("original", measuring.reference, expected, expected, labels),
              _stage("low-rank", lowrank, lowrank_outputs, expected, labels)]
    stages += _guarded_stages("low-rank + int8", lowrank_int8, expected, labels)
    stages += _guarded_stages("int8", original_int8, expected, labels)
    if opts.bench:
        _time_stages(measuring, stages, opts)
    slower = _slower_than_float(stages) if lowrank_int8.kept_float else None
    written = lowrank_int8.model is not None and slower is None
    for stage in stages:
        stage["written"] = stage["stage"] == ("low-rank + int8" if written else "low-rank")
    if lowrank_int8.model is None:
        run.warn(f"INT8 adds {lowrank_int8.unguarded_verdict.value:.4g} to the output error, more than the "
                 f"tolerance, and {lowrank_int8.failure}: the float low-rank model is written")
    elif slower is not None:
        lowrank_int8.failure = slower
        run.warn(f"INT8 meets the tolerance only with {len(lowrank_int8.kept_float)} nodes in float, and then "
                 f"{slower}: the float low-rank model is written")
    report.stages = [{key: value for key, value in stage.items() if key != "model"} for stage in stages]
    report.int8 = {"format": "QDQ, per-channel symmetric int8 weights, "
                             + ("symmetric int8 activations" if symmetric_activations(opts) else "uint8 activations"),
                   "calibration": opts.int8_calibration, "tolerance": tolerance.text,
                   "written": "int8" if written else "float", "guard": _describe(lowrank_int8),
                   "kept_float": {name: kept.describe() for name, kept in lowrank_int8.kept_float.items()},
                   "int8_alone": {"guard": _describe(original_int8),
                                  "kept_float": {n: k.describe() for n, k in original_int8.kept_float.items()}}}
    return lowrank_int8.model if written else lowrank


def _describe(guarded: Guarded) -> dict:
    return {**guarded.describe(), "held_out_evaluations_bound": max_evaluations(guarded.ranked)}


def _stage(name: str, model, outputs: dict, expected: dict, labels, kept_float: int = 0) -> dict:
    return {"stage": name, "model": model, "fidelity": asdict(compare_outputs(expected, outputs, labels)),
            "kept_float": kept_float, "latency_ms": {}}


def _guarded_stages(name: str, guarded: Guarded, expected: dict, labels) -> list[dict]:
    """The guarded model's stage, and the all-INT8 one beside it where the guard changed it."""
    stages = []
    if guarded.model is not None:
        stages.append(_stage(name, guarded.model, guarded.verdict.outputs, expected, labels, len(guarded.kept_float)))
    if guarded.model is not guarded.unguarded:
        stages.append(_stage(f"{name}, all nodes", guarded.unguarded, guarded.unguarded_verdict.outputs, expected,
                             labels))
    return stages


def _slower_than_float(stages: list[dict]) -> str | None:
    """Why the guarded INT8 model is not worth writing: it measured slower than the float low-rank
    model on the first provider timed (each node kept in float costs int8/float conversions)."""
    by_name = {stage["stage"]: stage["latency_ms"] for stage in stages}
    floats, int8 = by_name["low-rank"], by_name.get("low-rank + int8", {})
    provider = next((p for p in floats if p in int8), None)
    if provider is None or int8[provider]["p50"] <= floats[provider]["p50"]:
        return None
    return (f"it measured {int8[provider]['p50']:.3g} ms against {floats[provider]['p50']:.3g} ms for the float "
            f"model on {provider}")


def _time_stages(measuring: Measuring, stages: list[dict], opts) -> None:
    with measuring.run.stage("benchmark", "measuring the latency of every stage"):
        feeds = measuring.benchmark_feeds(opts.bench_batch)
        for provider in [p for p in opts.providers if provider_available(p)]:
            try:
                times = interleaved_times([s["model"] for s in stages], feeds, provider=provider,
                                          threads=opts.threads, rounds=opts.bench_rounds)
            except ProviderError as exc:  # installed but cannot start: the main table says so too
                log.info("INT8 stages not timed on %s: %s", provider, exc)
                continue
            for stage, measured in zip(stages, times):
                stage["latency_ms"][provider] = {"p50": float(np.median(measured)),
                                                 "p90": float(np.percentile(measured, 90))}
