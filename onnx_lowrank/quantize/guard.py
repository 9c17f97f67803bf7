"""Accuracy-controlled INT8: quantize everything, measure, and where INT8 costs more than the
tolerance, find the nodes responsible by measurement and keep the fewest of them in float
(the scheme of NNCF's ``quantize_with_accuracy_control``, on onnxruntime's quantizer).

1. The model with every node quantized is measured on the held-out set (``accept``). Within the
   tolerance, it is the answer: the guard costs nothing more.
2. Otherwise each quantized node is ranked by the damage INT8 does there: the output error,
   against the float model, of the model with that node alone quantized (its inputs' QDQ pairs,
   its weights), on a few calibration samples (never the held-out ones). Weight-side and
   activation-side damage both show. Alone, because removed one at a time from the all-INT8
   model, a culprit hides behind the next (a wide-range tensor quantized by its producer and by
   its consumer: restoring either alone changes nothing).
3. The smallest prefix of that ranking whose model meets the tolerance on the held-out set is
   found by doubling, then bisection: at most ``2 ceil(log2 n) + 1`` held-out measurements for n
   ranked nodes, so a model whose INT8 breaks in many places (every depthwise conv, say) is
   searched as cheaply as one with a single culprit.
4. At most half of the quantized nodes are kept in float (``MAX_FLOAT_SHARE``): past that the
   model is mostly float with conversions between, slower than the float model it came from.
   If that misses the tolerance, there is no INT8 model to write.

Each node kept in float gets its reason from one more measurement: its damage with its constant
operands (weights, bias, a Mul's scale) left in float says how much of it is its activations'
noise; the rest is weight rounding.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from onnx_lowrank.quantize.quantizer import Int8Quantizer, quantized_nodes

log = logging.getLogger(__name__)

RANKING_SAMPLES = 8  # calibration samples a node's damage is measured on: the ranking needs order, not precision
MAX_FLOAT_SHARE = 0.5


@dataclass(frozen=True)
class Verdict:
    """A model measured on the held-out set: ``value`` is what the tolerance limits (the output
    error INT8 adds, or a budget's figure), ``outputs`` what it was computed from."""

    value: float
    met: bool
    outputs: dict[str, np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class KeptFloat:
    """A node the guard kept in float: the output error (relative, on the ranking samples) of the
    model with it alone quantized, and the share of that its constant operands' rounding makes."""

    damage: float
    weight_share: float

    @property
    def reason(self) -> str:
        return "weight rounding" if self.weight_share >= 0.5 else "activation noise"

    def describe(self) -> dict:
        return {"reason": self.reason, "error_alone": self.damage, "weight_share": self.weight_share}


@dataclass
class Guarded:
    """The guard's answer: ``model`` (None when no node set met the tolerance) and its verdict,
    and the model with every node quantized, for comparison."""

    model: onnx.ModelProto | None
    verdict: Verdict | None
    unguarded: onnx.ModelProto
    unguarded_verdict: Verdict
    kept_float: dict[str, KeptFloat] = field(default_factory=dict)
    ranked: int = 0  # nodes ranked, one quantization and one run of the ranking samples each
    evaluations: int = 1  # held-out measurements
    seconds: float = 0.0
    failure: str | None = None

    def describe(self) -> dict:
        return {"met": self.model is not None, "measured": None if self.verdict is None else self.verdict.value,
                "all_int8_measured": self.unguarded_verdict.value, "nodes_ranked": self.ranked,
                "held_out_evaluations": self.evaluations, "ranking_samples": RANKING_SAMPLES,
                "seconds": self.seconds, "failure": self.failure}


def guard_int8(quantizer: Int8Quantizer, accept: Callable[[onnx.ModelProto], Verdict],
               ranking_error: Callable[[onnx.ModelProto], float], restore: bool = True) -> Guarded:
    """The INT8 model of ``quantizer`` with the fewest nodes in float that ``accept`` (a held-out
    measurement) passes. ``ranking_error``: a model's output error against the float model on the
    ranking samples. Without ``restore``, only the all-INT8 model is measured."""
    clock = time.perf_counter()
    unguarded = quantizer.quantize()
    first = accept(unguarded)
    result = Guarded(unguarded if first.met else None, first if first.met else None, unguarded, first)
    if not first.met and restore:
        _restore(quantizer, accept, ranking_error, result)
    elif not first.met:
        result.failure = "not searched (a comparison)"
    result.seconds = time.perf_counter() - clock
    return result


def _restore(quantizer: Int8Quantizer, accept, ranking_error, result: Guarded) -> None:
    candidates = quantized_nodes(result.unguarded)
    damage = {name: ranking_error(quantizer.quantize(only=[name])) for name in candidates}
    result.ranked = len(candidates)
    order = sorted(candidates, key=lambda n: -damage[n])[:max(1, int(MAX_FLOAT_SHARE * len(candidates)))]
    log.info("INT8 misses the tolerance (%.4g); the most damaged of %d quantized nodes: %s",
             result.unguarded_verdict.value, len(candidates),
             ", ".join(f"{n} ({damage[n]:.3g})" for n in order[:5]))
    found = _smallest_passing_prefix(order, lambda count: _measured(quantizer, accept, order[:count], result))
    if found is None:
        result.failure = (f"with the {len(order)} most damaged of its {len(candidates)} quantized nodes in float "
                          f"it still measures {result.verdict.value:.4g}")
        result.verdict = None
        return
    count, (model, verdict) = found
    result.model, result.verdict = model, verdict
    for name in order[:count]:
        activations = ranking_error(quantizer.with_float_constants(quantizer.quantize(only=[name]), name))
        share = float(np.clip(1 - activations / damage[name], 0.0, 1.0)) if damage[name] > 0 else 0.0
        result.kept_float[name] = KeptFloat(float(damage[name]), share)
    log.info("INT8 meets the tolerance with %d nodes in float: %s", count, ", ".join(order[:count]))


def _measured(quantizer: Int8Quantizer, accept, keep_float: list[str], result: Guarded):
    model = quantizer.quantize(keep_float)
    verdict = accept(model)
    result.evaluations += 1
    result.verdict = verdict
    log.debug("INT8 with %d nodes in float: %.4g (%s)", len(keep_float), verdict.value,
              "met" if verdict.met else "missed")
    return model, verdict


def _smallest_passing_prefix(order: list[str], measure) -> tuple[int, tuple] | None:
    """The smallest count whose measurement is met (``measure(count)`` -> (model, verdict)), by
    doubling from 1 up to ``len(order)``, then bisecting between the last miss and the first pass."""
    missed, count = 0, 1
    while True:
        count = min(count, len(order))
        measured = measure(count)
        if measured[1].met:
            break
        if count == len(order):
            return None
        missed, count = count, count * 2
    passing = (count, measured)
    while passing[0] - missed > 1:
        middle = (missed + passing[0]) // 2
        measured = measure(middle)
        if measured[1].met:
            passing = (middle, measured)
        else:
            missed = middle
    return passing


def max_evaluations(ranked: int) -> int:
    """The bound on held-out measurements of a guard that ranked ``ranked`` nodes."""
    steps = math.ceil(math.log2(ranked)) if ranked > 1 else 0
    return 1 + (2 * steps + 1 if ranked else 0)
