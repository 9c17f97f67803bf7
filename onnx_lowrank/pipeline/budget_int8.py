"""INT8 on top of a budget search's answer: the budget itself is the INT8 guard's tolerance,
and where no INT8 model of the plan found meets it, slower plans of the method are tried."""

from __future__ import annotations

import logging

from onnx_lowrank.output.report import INT8_SUFFIX, FrontierPoint
from onnx_lowrank.pipeline.budget import Budget
from onnx_lowrank.quantize import Tolerance, int8_of

log = logging.getLogger(__name__)

INT8_STEPS = 2  # slower plans tried when INT8 on top of the one found breaks the budget


def budget_tolerance(budget: Budget, labels) -> Tolerance:
    """The budget as INT8's tolerance: a model passes where it meets the budget itself."""
    def judge(reference: dict, float_outputs: dict):
        def met(outputs: dict) -> tuple[float, bool]:
            value = budget.value(reference, outputs, labels)
            return value, budget.met(value)
        return met
    return Tolerance(f"the budget: {budget.describe()}", judge)


def int8_within_budget(searcher, best):
    """The found plan with INT8 on top, guarded by the budget (``quantize.guard``: nodes that
    break it kept in float); where no INT8 model of the plan meets it, the method at slower
    plans, halfway to 1x, ``INT8_STEPS`` times. ``searcher`` is the search's
    (``pipeline.search``). Returns the float plan's (point, solved, model, held-out outputs) and
    (INT8 point, Guarded), or Nones."""
    judge = budget_tolerance(searcher.budget, searcher.labels).judge(searcher.reference, None)
    candidate = best
    for _ in range(INT8_STEPS + 1):
        if candidate is not None and candidate[0].met:
            point, _, optimized, _ = candidate
            with searcher.analysis.run.stage("quantize", f"INT8 on the plan at {point.speedup_target:.2f}x"):
                quantized = int8_of(searcher.analysis.measuring(), optimized, searcher.opts, judge)
            verdict = quantized.verdict or quantized.unguarded_verdict
            int8_point = FrontierPoint(point.speedup_target, point.theoretical_speedup, verdict.value,
                                       quantized.model is not None, f"{point.solver}{INT8_SUFFIX}")
            searcher.frontier.append(int8_point)
            log.info("%s at %.2fx: %s = %.4g (%s)", int8_point.solver, point.theoretical_speedup,
                     searcher.budget.kind, verdict.value, "met" if int8_point.met else "missed")
            if int8_point.met:
                return candidate, (int8_point, quantized)
            slower = point.speedup_target
        else:
            slower = candidate[0].speedup_target if candidate is not None else slower
        candidate = searcher.evaluate(1 + (slower - 1) / 2, searcher.opts, searcher.opts.method)
    return None, None
