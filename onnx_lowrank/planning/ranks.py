"""Rank selection: which rank each decomposable layer gets for a whole-model speedup target.

Pure arithmetic on the cost model (no ONNX). Costs are exact MACs of the factorised pair of the
candidate's scheme (channel: the 1x1 layer's ``d * d'`` included; spatial: the k x 1 conv on
every input column). Ranks are kept to multiples of ``multiple`` because onnxruntime's NCHWc CPU
layout only takes a conv whose input channels are a multiple of its block (8 or 16): an off-grid
rank sends the rest of the chain back to NCHW with reorders (measured in benchmarks/HISTORY.md).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from onnx_lowrank.errors import InfeasibleTargetError
from onnx_lowrank.planning.costs import SCHEMES, ConvShape, break_even_rank, decomposed_macs, macs_per_rank, max_rank

FIRST_LAYER_REASON = "first conv layer: left alone, as in the paper"


class Form(NamedTuple):
    """One form a layer can take in a latency plan: ``rank`` 0 is the layer as it is; a channel
    decomposition at ``rank`` d'; with a ``spatial`` rank d'' > 0 also its k x k part split into
    (k x 1, d'') -> (1 x k, d') (3d, paper §3.5)."""

    rank: int
    spatial: int = 0


WHOLE = Form(0)


@dataclass(frozen=True)
class RankCandidate:
    """A decomposable layer as rank selection sees it: its shape and how it would be factorised
    (``scheme``, see :mod:`onnx_lowrank.planning.costs`)."""

    name: str
    shape: ConvShape
    scheme: str = "channel"
    dense: bool = False  # a Gemm/MatMul layer, never "the first conv" the paper leaves whole

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown factorisation scheme {self.scheme!r}")

    def macs_at(self, rank: int) -> int:
        return decomposed_macs(self.shape, rank, self.scheme)

    @property
    def per_rank_macs(self) -> int:
        return macs_per_rank(self.shape, self.scheme)

    @property
    def break_even(self) -> int:
        return break_even_rank(self.shape, self.scheme)

    @property
    def full_rank(self) -> int:
        return max_rank(self.shape, self.scheme)

    def step(self, multiple: int) -> int:
        """The layer's rank grid: ``multiple``; for a grouped conv (whose rank is split evenly among
        its G groups) the multiple of G at or above it."""
        groups = self.shape.group
        return groups * -(-multiple // groups)


@dataclass
class RankPlan:
    """Chosen ranks, the layers left at full rank (with why), and the resulting conv cost."""

    ranks: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0

    @property
    def speedup(self) -> float:
        return self.macs_before / self.macs_after


def validate_speedup(speedup: float) -> float:
    if not isinstance(speedup, (int, float)) or not speedup > 1.0 or speedup != speedup:
        raise ValueError(f"speedup must be a number greater than 1, got {speedup!r}")
    return float(speedup)


def validate_multiple(multiple: int) -> int:
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"rank multiple must be a positive integer, got {multiple!r}")
    return multiple


def uniform_ranks(candidates: list[RankCandidate], fixed_macs: int, speedup: float,
                  multiple: int = 16, leave_first: bool = True) -> RankPlan:
    """Give every decomposed layer the same cost ratio, so the whole conv cost is ``1/speedup``.

    ``fixed_macs`` is the cost of the convs that stay as they are (non-decomposable or skipped
    by the user). Rounding to ``multiple`` carries each layer's rounding error into the next, so
    the total still meets the target; a layer whose rounded rank would save nothing is left alone.
    """
    plan, active, kept_macs, target = _eligible(candidates, fixed_macs, speedup, multiple, leave_first)
    ranks = _round_with_carry(active, (target - kept_macs) / sum(c.shape.macs for c in active), multiple)
    _shrink_to_target(active, ranks, kept_macs, target, multiple, plan.macs_before)
    plan.ranks = ranks
    plan.macs_after = kept_macs + sum(c.macs_at(ranks[c.name]) for c in active)
    return plan


def energy_ranks(candidates: list[RankCandidate], eigenvalues: dict[str, np.ndarray], fixed_macs: int,
                 speedup: float, multiple: int = 16, leave_first: bool = True) -> RankPlan:
    """Whole-model rank selection of paper Eq. 13-14, greedy.

    Maximises the product over layers of the PCA energy kept, ``E_l(d'_l) = sum_{a <= d'_l}
    sigma_{l,a}`` (``eigenvalues[name]``, descending), subject to the total conv cost. Every
    layer starts at ``d'_l = d_l``; each step lowers by ``multiple`` the rank of the layer whose
    step loses the least energy per MAC saved, ``(Delta E / E) / Delta C``, until the cost meets
    ``1/speedup``. A last pass spends what the final step overshot on the best rank increases.

    The cost is exact, not the paper's ``d'/d C_l``: a decomposed layer costs ``rank *
    macs_per_rank`` (channel: ``positions * (k^2 c + d)``, the 1x1 layer included), and a layer whose rank
    is still at or above the break-even rank costs what the original does (it is left alone).
    Steps are scored on that linear cost, so the step across break-even is not over-penalised.
    The search only visits multiples of ``multiple``, so the result meets the target as is.
    """
    plan, active, kept_macs, target = _eligible(candidates, fixed_macs, speedup, multiple, leave_first)
    spectra = {c.name: _energy_curve(eigenvalues[c.name], c.full_rank) for c in active}
    ranks = {c.name: c.full_rank for c in active}

    def energy_lost(cand: RankCandidate, rank: int, lower: int) -> float:
        energy = spectra[cand.name]
        return (energy[rank] - energy[lower]) / max(energy[rank], np.finfo(float).tiny)

    def infeasible(total: float) -> InfeasibleTargetError:
        return InfeasibleTargetError(
            f"a {speedup:.4g}x conv speedup cannot be reached",
            hint=f"with every decomposable layer at the minimum rank {multiple} the conv speedup "
                 f"is {plan.macs_before / total:.3g}x; ask for less, lower --rank-multiple or "
                 "--skip fewer layers")

    total = _lower_greedily(active, ranks, energy_lost, kept_macs, target, multiple, infeasible)
    total = target - _spend_slack(active, ranks, spectra, target - total, multiple)
    return _finished(plan, active, ranks, total, "its energy")


def _finished(plan: RankPlan, active: list[RankCandidate], ranks: dict[str, int], total: float,
              worth: str) -> RankPlan:
    """The plan with the chosen ranks; a layer left at or above break-even stays whole."""
    for cand in active:
        if ranks[cand.name] >= cand.break_even:
            plan.skipped[cand.name] = f"rank selection keeps it: {worth} is worth more than its cost"
    plan.ranks = {n: r for n, r in ranks.items() if n not in plan.skipped}
    plan.macs_after = int(round(total))
    return plan


def _lower_greedily(active: list[RankCandidate], ranks: dict[str, int], step_loss, kept_macs: int, target: float,
                    multiple: int, infeasible) -> float:
    """Lower ranks in steps of ``multiple``, each time the layer whose step loses the least
    (``step_loss(candidate, rank, lower)``) per MAC saved, until the conv cost meets ``target``;
    returns the cost. Steps are scored on the linear cost, so the step across break-even is not
    over-penalised; ``infeasible(cost)`` is raised when every layer is at the smallest rank."""
    by_name = {c.name: c for c in active}

    def score(cand: RankCandidate) -> float | None:
        rank = ranks[cand.name]
        lower = _next_multiple_below(rank, cand.step(multiple))
        if lower is None:
            return None
        return step_loss(cand, rank, lower) / ((rank - lower) * cand.per_rank_macs)

    heap = [(s, c.name) for c in active if (s := score(c)) is not None]
    heapq.heapify(heap)
    total = kept_macs + sum(c.shape.macs for c in active)
    while total > target:
        if not heap:
            raise infeasible(total)
        cand = by_name[heapq.heappop(heap)[1]]
        before = _effective_macs(cand, ranks[cand.name])
        ranks[cand.name] = _next_multiple_below(ranks[cand.name], cand.step(multiple))
        total -= before - _effective_macs(cand, ranks[cand.name])
        if (next_score := score(cand)) is not None:
            heapq.heappush(heap, (next_score, cand.name))
    return total


def _next_multiple_below(rank: int, multiple: int) -> int | None:
    lower = (rank - 1) // multiple * multiple
    return lower if lower >= multiple else None


def _effective_macs(cand: RankCandidate, rank: int) -> int:
    """What the layer costs at ``rank``: the original's cost once decomposing no longer saves."""
    return cand.shape.macs if rank >= cand.break_even else cand.macs_at(rank)


def _spend_slack(active, ranks, spectra, slack: float, multiple: int) -> float:
    """Raise ranks by ``multiple``, best energy gain per MAC first, while the cost stays within
    ``slack``; returns the slack left."""
    while True:
        best = None
        for cand in active:
            rank, step = ranks[cand.name], cand.step(multiple)
            if rank + step > cand.full_rank:
                continue
            extra = _effective_macs(cand, rank + step) - _effective_macs(cand, rank)
            if extra > slack:
                continue
            energy = spectra[cand.name]
            gain = (energy[rank + step] - energy[rank]) / max(energy[rank + step], np.finfo(float).tiny)
            ratio = gain / max(extra, 1)
            if best is None or ratio > best[0]:
                best = (ratio, cand, extra)
        if best is None or best[0] <= 0:
            return slack
        _, cand, extra = best
        ranks[cand.name] += cand.step(multiple)
        slack -= extra


def _energy_curve(eigenvalues: np.ndarray, dim: int) -> np.ndarray:
    """``curve[r]`` = fraction of the energy in the top ``r`` eigenvalues, for r = 0..dim."""
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    if values.shape != (dim,):
        raise ValueError(f"expected {dim} eigenvalues, got shape {values.shape}")
    total = values.sum()
    curve = np.concatenate([[0.0], np.cumsum(values)])
    return curve / total if total > 0 else np.ones(dim + 1)


def leave_first_conv(plan: RankPlan, active: list[RankCandidate]) -> list[RankCandidate]:
    """The paper leaves the first conv whole (few input channels, little of the cost); a dense
    layer before it is not that layer."""
    first = next((c for c in active if not c.dense), None)
    if first is None or len(active) < 2:
        return active
    plan.skipped[first.name] = FIRST_LAYER_REASON
    return [c for c in active if c is not first]


def _eligible(candidates: list[RankCandidate], fixed_macs: int, speedup: float, multiple: int,
              leave_first: bool) -> tuple[RankPlan, list[RankCandidate], int, float]:
    """The plan with the layers left alone and why, the layers to decompose, the cost of the
    untouched convs and the target cost."""
    speedup = validate_speedup(speedup)
    multiple = validate_multiple(multiple)
    plan = RankPlan(macs_before=fixed_macs + sum(c.shape.macs for c in candidates))
    active = list(candidates)
    if leave_first:
        active = leave_first_conv(plan, active)
    for cand in list(active):
        if cand.break_even <= cand.step(multiple):
            plan.skipped[cand.name] = (
                f"cannot pay off: rank {cand.step(multiple)} already costs as much as the original "
                f"({cand.shape.in_channels}->{cand.shape.out_channels}, "
                f"{cand.shape.kernel[0]}x{cand.shape.kernel[1]})")
            active.remove(cand)
    if not active:
        raise InfeasibleTargetError("no layer can be decomposed profitably",
                                    hint="see the skipped layers in the report")
    kept_macs = fixed_macs + sum(c.shape.macs for c in candidates if c.name in plan.skipped)
    return plan, active, kept_macs, plan.macs_before / speedup


def _round_with_carry(active: list[RankCandidate], ratio: float, multiple: int) -> dict[str, int]:
    ranks: dict[str, int] = {}
    carry = 0.0
    for cand in active:
        wanted = max(ratio, 0.0) * cand.shape.macs + carry
        ideal = wanted / cand.per_rank_macs
        step = cand.step(multiple)
        ceiling = (cand.break_even - 1) // step * step
        rank = min(max(step, round(ideal / step) * step), ceiling)
        ranks[cand.name] = rank
        carry = wanted - cand.macs_at(rank)
    return ranks


def _shrink_to_target(active: list[RankCandidate], ranks: dict[str, int], kept_macs: float,
                      target: float, multiple: int, macs_before: int) -> None:
    """Lower ranks one step at a time until the total meets ``target``.

    Each step lowers the layer whose one-step saving is the smallest that still covers the
    overshoot (or, if none covers it, the largest saving), so a small overshoot left by rounding
    does not cost a wide early layer a quarter of its channels.
    """
    def total() -> float:
        return kept_macs + sum(c.macs_at(ranks[c.name]) for c in active)

    while (overshoot := total() - target) > 0:
        lowerable = [c for c in active if ranks[c.name] - c.step(multiple) >= c.step(multiple)]
        if not lowerable:
            raise InfeasibleTargetError(
                f"a {macs_before / target:.4g}x conv speedup cannot be reached",
                hint=f"with every decomposable layer at the minimum rank {multiple} the conv speedup "
                     f"is {macs_before / total():.3g}x; ask for less, lower --rank-multiple or "
                     "--skip fewer layers")
        covering = [c for c in lowerable if c.per_rank_macs * c.step(multiple) >= overshoot]
        if covering:
            chosen = min(covering, key=lambda c: c.per_rank_macs * c.step(multiple))
        else:
            chosen = max(lowerable, key=lambda c: c.per_rank_macs * c.step(multiple))
        ranks[chosen.name] -= chosen.step(multiple)

def rank_ladder(candidate: RankCandidate, multiple: int) -> list[int]:
    """Ranks to measure a layer's sensitivity at: fractions of its useful range, on the grid."""
    top, step = min(candidate.full_rank, candidate.break_even), candidate.step(multiple)
    ladder = {int(top * f) // step * step for f in (0.75, 0.5, 0.35, 0.25, 0.18, 0.125, 0.09)}
    return sorted((r for r in ladder if step <= r < top), reverse=True)
