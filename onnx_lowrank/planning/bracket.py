"""Where a budget search runs next: bracketing, interpolating and bisecting speedups on measured
losses (pure arithmetic; ``pipeline.search`` runs the plans)."""

from __future__ import annotations

import math

PRECISION = 0.05  # stop when the bracket is within 5 % in speedup
# A quick run of the method costs what several probes do: it takes a step only to gain 10 %.
METHOD_PRECISION = 0.10


def next_probe(passing: float | None, failing: float | None,
               losses: tuple[float, float, float] | None = None, precision: float = PRECISION) -> float | None:
    """Double above a plan that met, halve the way to 1x below one that missed; then, while the
    bracket is wider than ``PRECISION``, a little below where the loss reaches the budget on the
    power law through the two ends (``losses``: at ``passing``, at ``failing``, the budget's), so
    that the probe likely meets it and closes the bracket from below: about four probes where
    bisection takes six (a simulated search over smooth noisy curves), at the same precision.
    Geometric bisection where the losses cannot say (a user metric, a loss of 0 or not rising).
    None when nothing is left: the bracket is within ``precision``, or the crossing is within it
    of ``passing``."""
    if failing is None:
        return passing * 2
    if passing is None:
        lower = 1 + (failing - 1) / 2
        return lower if lower >= 1.02 else None
    if failing / passing < 1 + precision:
        return None
    if losses is None or not 0 < losses[0] < losses[1] or not losses[2] > 0:
        return math.sqrt(passing * failing)
    at_passing, at_failing, limit = losses
    reach = math.log(limit / at_passing) / math.log(at_failing / at_passing)
    if passing * (failing / passing) ** reach <= passing * (1 + precision):
        return None
    speedup = passing * (failing / passing) ** min(max(reach, 0.1), 0.9) / (1 + precision / 2)
    return speedup if speedup > passing * (1 + precision / 2) else None


def extrapolated(slower: float, faster: float, losses: tuple[float, float, float]) -> float | None:
    """Above two plans that met the budget, where the power law through their losses
    (``losses``: at ``slower``, at ``faster``, the budget's) reaches the budget: a little below it,
    and at most twice ``faster``. None where the losses cannot say (not rising) or the step would
    be within ``METHOD_PRECISION`` (this steps the method's quick runs)."""
    at_slower, at_faster, limit = losses
    if not 0 < at_slower < at_faster < limit:
        return None
    exponent = math.log(at_faster / at_slower) / math.log(faster / slower)
    reach = faster * (limit / at_faster) ** (1 / exponent)
    speedup = min(reach, 2 * faster) / (1 + PRECISION / 2)
    return speedup if speedup > faster * (1 + METHOD_PRECISION) else None
