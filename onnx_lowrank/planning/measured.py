"""Rank selection from measurements: losses measured per layer and rank (sensitivity), and
latency tables per layer and form (``--objective latency``). Pure arithmetic, as ``ranks``."""

from __future__ import annotations

import heapq

import numpy as np

from onnx_lowrank.errors import InfeasibleTargetError
from onnx_lowrank.planning.ranks import (
    WHOLE,
    Form,
    RankCandidate,
    RankPlan,
    _effective_macs,
    _eligible,
    _energy_curve,
    _finished,
    _lower_greedily,
    leave_first_conv,
    rank_ladder,
    validate_speedup,
)


def measured_ranks(candidates: list[RankCandidate], losses: dict[str, dict[int, float]], fixed_macs: int,
                   speedup: float, multiple: int = 16, leave_first: bool = True,
                   hopeless: float = 0.5) -> RankPlan:
    """Whole-model rank selection from measured sensitivity (AIMET's greedy ratio selection, ASVD).

    ``losses[name][rank]`` is the end-to-end output degradation measured with only that layer
    decomposed at ``rank`` (any non-negative loss; 0 at full rank). Between measured ranks the loss
    is interpolated linearly, and it never falls as the rank falls. Greedy as Eq. 13-14: each step
    lowers by ``multiple`` the rank of the layer that adds the least loss per MAC saved, until the
    conv cost meets ``1/speedup``. A layer whose smallest loss already exceeds ``hopeless`` is left
    whole.
    """
    plan, active, kept_macs, target = _eligible(candidates, fixed_macs, speedup, multiple, leave_first)
    for cand in list(active):
        measured = losses.get(cand.name) or {}
        if not measured or min(measured.values()) > hopeless:
            plan.skipped[cand.name] = (f"measured sensitivity: every candidate rank degrades the output by more than "
                                       f"{hopeless:g}" if measured else "no sensitivity measured")
            active.remove(cand)
            kept_macs += cand.shape.macs
    curves = {c.name: _loss_curve(losses[c.name], c.full_rank) for c in active}
    ranks = {c.name: c.full_rank for c in active}

    def loss_added(cand: RankCandidate, rank: int, lower: int) -> float:
        return curves[cand.name][lower] - curves[cand.name][rank]

    def infeasible(total: float) -> InfeasibleTargetError:
        return InfeasibleTargetError(
            f"a {speedup:.4g}x conv speedup cannot be reached with the layers sensitivity lets go",
            hint=f"at most {plan.macs_before / total:.3g}x; ask for less or lower --rank-multiple")

    total = _lower_greedily(active, ranks, loss_added, kept_macs, target, multiple, infeasible)
    total = target - _spend_loss_slack(active, ranks, curves, target - total, multiple)
    return _finished(plan, active, ranks, total, "its measured loss")


def _spend_loss_slack(active, ranks, curves, slack: float, multiple: int) -> float:
    """Raise ranks by ``multiple`` (up to whole), the most loss removed per MAC first, while the
    cost stays within ``slack``; returns the slack left."""
    while True:
        best = None
        for cand in active:
            rank = ranks[cand.name]
            if rank >= cand.full_rank:
                continue
            higher = min(rank + cand.step(multiple), cand.full_rank)
            extra = _effective_macs(cand, higher) - _effective_macs(cand, rank)
            gain = curves[cand.name][rank] - curves[cand.name][higher]
            if extra > slack or gain <= 0:
                continue
            if best is None or gain / max(extra, 1) > best[0]:
                best = (gain / max(extra, 1), cand, higher, extra)
        if best is None:
            return slack
        _, cand, higher, extra = best
        ranks[cand.name] = higher
        slack -= extra


def _loss_curve(measured: dict[int, float], full_rank: int) -> np.ndarray:
    """``curve[r]`` for r = 0..full_rank: the measured losses with 0 at full rank, interpolated, and
    made non-increasing in r (a lower rank never loses less)."""
    points = sorted({**{int(r): max(float(v), 0.0) for r, v in measured.items() if 0 < r <= full_rank},
                     full_rank: 0.0}.items())
    ranks, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points])
    curve = np.interp(np.arange(full_rank + 1), ranks, values)  # below the lowest measured rank: its loss
    return np.maximum.accumulate(curve[::-1])[::-1]



def latency_forms(candidate: RankCandidate, multiple: int, split: bool) -> list[Form]:
    """The forms a latency plan times for a layer besides the layer itself: its channel
    decomposition at each rank of its ladder and, with ``split`` (3d), each of those chains with
    its k x k part split at d'' = d' and d'/2 on the grid."""
    ladder = rank_ladder(candidate, multiple)
    step = candidate.step(multiple)
    forms = [Form(rank) for rank in ladder]
    if split:
        forms += [Form(rank, spatial) for rank in ladder for spatial in sorted({rank, max(step, rank // 2 // step * step)})]
    return forms


def _pareto_front(cand: RankCandidate, eigenvalues: np.ndarray, latency: dict[Form, float],
                  spatial: np.ndarray | None) -> list[tuple[float, float, Form]]:
    """(ms, kept energy, form) of the layer's measured forms that no faster form keeps more energy
    than, fastest first."""
    energy = _energy_curve(eigenvalues, cand.full_rank)
    split = _energy_curve(spatial, len(spatial)) if spatial is not None else None

    def kept(form: Form) -> float:
        if form.rank == 0:
            return 1.0
        channel = float(energy[form.rank])
        return channel if not form.spatial else channel * float(split[min(form.spatial, len(split) - 1)])

    options = sorted((ms, kept(form), form) for form, ms in latency.items()
                     if form.rank < cand.full_rank and (not form.spatial or split is not None))
    front: list[tuple[float, float, Form]] = []
    for option in options:
        if not front or option[1] > front[-1][1]:
            front.append(option)
    return front


def _fill_plan(plan: RankPlan, chosen: dict[str, Form]) -> dict[str, int]:
    """Each layer's chosen form into ``plan``; returns the spatial ranks of the 3d forms."""
    spatial_ranks = {}
    for name, form in chosen.items():
        if form.rank == 0:
            plan.skipped[name] = "measured latency: no faster form of it is worth its energy"
        else:
            plan.ranks[name] = form.rank
            if form.spatial:
                spatial_ranks[name] = form.spatial
    return spatial_ranks


def latency_ranks(candidates: list[RankCandidate], eigenvalues: dict[str, np.ndarray],
                  latency: dict[str, dict[Form, float]], fixed_ms: float, speedup: float,
                  spatial_eigenvalues: dict[str, np.ndarray] | None = None,
                  leave_first: bool = True) -> tuple[RankPlan, dict[str, int], float, float]:
    """Rank selection on measured time instead of MACs: Eq. 13-14's product of kept energy,
    maximised subject to the summed latency of the layers measured alone, ``latency[name][form]``
    (``WHOLE``: the original layer), meeting ``1/speedup`` of the original's. A 3d form keeps the
    product of its channel energy and the energy of the spatial split of the layer's weights
    (``spatial_eigenvalues``, the proxy its filter reconstruction truncates).

    A layer's options are its measured forms on their Pareto front (``_pareto_front``), so an
    off-grid rank or a chain no faster than the original is never chosen. Greedy: every layer starts
    whole; each step moves the layer whose next faster option loses the least log-energy per ms
    saved, until the target is met; the last step's overshoot is then spent on the best moves up.
    Returns the plan (MACs filled in by the caller), the spatial ranks of the 3d forms, and the
    predicted latency before and after, in ms."""
    validate_speedup(speedup)
    plan = RankPlan()
    active = list(candidates)
    if leave_first:
        active = leave_first_conv(plan, active)
    fronts = {cand.name: _pareto_front(cand, eigenvalues[cand.name], latency[cand.name],
                                       spatial_eigenvalues.get(cand.name) if spatial_eigenvalues else None)
              for cand in active}
    before = fixed_ms + sum(latency[c.name][WHOLE] for c in candidates)
    target = before / speedup
    position = {name: len(front) - 1 for name, front in fronts.items()}  # the most energy: the whole layer

    def total() -> float:
        return (fixed_ms + sum(latency[n][WHOLE] for n in plan.skipped if n in latency)
                + sum(fronts[n][i][0] for n, i in position.items()))

    def step_score(name: str, down: bool) -> float | None:
        i = position[name]
        j = i - 1 if down else i + 1
        if not 0 <= j < len(fronts[name]):
            return None
        (ms_i, e_i, _), (ms_j, e_j, _) = fronts[name][i], fronts[name][j]
        lost = abs(np.log(max(e_i, 1e-300)) - np.log(max(e_j, 1e-300)))
        return lost / max(abs(ms_i - ms_j), 1e-9)

    heap = [(s, n) for n in fronts if (s := step_score(n, True)) is not None]
    heapq.heapify(heap)
    while total() > target:
        if not heap:
            raise InfeasibleTargetError(f"a {speedup:.4g}x measured conv speedup cannot be reached",
                                        hint=f"at most {before / total():.3g}x on this provider; ask for less",
                                        reachable=before / total())
        name = heapq.heappop(heap)[1]
        position[name] -= 1
        if (score := step_score(name, True)) is not None:
            heapq.heappush(heap, (score, name))
    while ups := [(s, n) for n in fronts if (s := step_score(n, False)) is not None
                  and fronts[n][position[n] + 1][0] - fronts[n][position[n]][0] <= target - total()]:
        position[max(ups)[1]] += 1  # the last step's overshoot, spent on the moves up that buy the most energy
    after = total()
    spatial_ranks = _fill_plan(plan, {name: fronts[name][i][2] for name, i in position.items()})
    return plan, spatial_ranks, before, after
