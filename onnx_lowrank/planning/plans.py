"""The decomposed architecture for each method: which layers change, into which chain, at which ranks.

Pure arithmetic on the cost model and spectra (no ONNX). Every plan meets the target on exact
MACs of the chains it describes, with ranks rounded to ``multiple``.

* ``channel`` (methods linear, nonlinear, asymmetric, svd): (k x k, d') -> (1 x 1, d).
* ``latency``: per layer whole, channel or (asym3d) 3d, chosen on the measured time of each form.
* ``3d`` (asym3d, paper §3.5): rank selection of ``d'`` for a channel speedup ``r_c`` (default
  ``sqrt(r)``), then each resulting (k x k, c -> d') layer with k > 1 is split into
  (k x 1, c -> d'') -> (1 x k, d'' -> d') with one cost ratio for all of them (the paper's "d''
  depending on the speedup ratio"), sized so that the whole model meets ``r``. A layer whose
  split cannot pay off at the smallest ``d''`` stays a channel decomposition at its ``d'``; a
  layer the user keeps channel-only gets the rank channel-only selection gives it for ``r``.
* ``spatial`` (jaderberg): (k x 1, c -> d'') -> (1 x k, d'' -> d) for every k x k layer, k > 1.
* ``tucker2``: (1 x 1, c -> r1) -> (k x k, r1 -> r2) -> (1 x 1, r2 -> d), with ``r1 / c = r2 / d``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_lowrank.errors import InfeasibleTargetError, InvalidOptionError
from onnx_lowrank.planning.costs import ConvShape, decomposed_macs, tucker2_macs
from onnx_lowrank.planning.measured import latency_ranks, measured_ranks
from onnx_lowrank.planning.ranks import (
    Form,
    RankCandidate,
    RankPlan,
    energy_ranks,
    leave_first_conv,
    uniform_ranks,
    validate_speedup,
)

NO_SPATIAL_KERNEL = "1-wide kernel: nothing to split spatially"
KEPT_CHANNEL_ONLY = "kept channel-only (--channel-only)"


@dataclass
class ArchitecturePlan(RankPlan):
    """A rank plan with, per decomposed layer: ``ranks`` (d' of a channel decomposition; r2 of
    Tucker-2), ``spatial_ranks`` (d'' of a k x 1 / 1 x k split), ``input_ranks`` (r1 of Tucker-2);
    ``notes`` say why a layer is only partly decomposed."""

    spatial_ranks: dict[str, int] = field(default_factory=dict)
    input_ranks: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    channel_speedup: float | None = None  # 3d: what the channel part was planned for
    predicted_ms: tuple[float, float] | None = None  # latency plans: conv time before and after, layers timed alone
    in_model: list[dict] | None = None  # latency plans: each plan tried, timed in the whole model (profile.py)

    @property
    def layers(self) -> set[str]:
        return set(self.ranks) | set(self.spatial_ranks)

    def layer_macs(self, name: str, shape: ConvShape) -> int:
        """Exact MACs of the chain that replaces layer ``name``."""
        rank, spatial = self.ranks.get(name), self.spatial_ranks.get(name)
        if name in self.input_ranks:
            return tucker2_macs(shape, self.input_ranks[name], rank)
        if spatial is None:
            return decomposed_macs(shape, rank, "channel")
        if rank is None:
            return decomposed_macs(shape, spatial, "spatial")
        pointwise = shape.positions * shape.out_channels * rank
        return decomposed_macs(shape.with_out_channels(rank), spatial, "spatial") + pointwise

    @classmethod
    def from_ranks(cls, plan: RankPlan, spatial: bool = False) -> "ArchitecturePlan":
        return cls(ranks={} if spatial else dict(plan.ranks), spatial_ranks=dict(plan.ranks) if spatial else {},
                   skipped=dict(plan.skipped), macs_before=plan.macs_before, macs_after=plan.macs_after)


def has_spatial_extent(shape: ConvShape) -> bool:
    return shape.kernel[0] > 1 and shape.kernel[1] > 1 and not shape.transposed and shape.group == 1


def channel_plan(candidates: list[RankCandidate], spectra: dict[str, np.ndarray] | None,
                 fixed_macs: int, speedup: float, multiple: int,
                 losses: dict[str, dict[int, float]] | None = None) -> ArchitecturePlan:
    """Channel decomposition of every candidate: ranks from measured ``losses`` (sensitivity) when
    given, else energy selection (Eq. 13-14) when ``spectra`` are, else one cost ratio for all."""
    return ArchitecturePlan.from_ranks(_rank_plan(candidates, spectra, fixed_macs, speedup, multiple, losses))


def latency_plan(candidates: list[RankCandidate], spectra: dict[str, np.ndarray],
                 latency: dict[str, dict[Form, float]], fixed_ms: float, fixed_macs: int,
                 speedup: float, spatial_spectra: dict[str, np.ndarray] | None = None) -> ArchitecturePlan:
    """Each layer whole, channel-decomposed or (with ``spatial_spectra``, 3d) also split, chosen
    on measured latency (``ranks.latency_ranks``); the MACs of the result are filled in as for
    every plan."""
    ranks, spatial, before, after = latency_ranks(candidates, spectra, latency, fixed_ms, speedup, spatial_spectra)
    plan = ArchitecturePlan.from_ranks(ranks)
    plan.spatial_ranks = spatial
    plan.macs_before = fixed_macs + sum(c.shape.macs for c in candidates)
    plan.macs_after = plan.macs_before - sum(c.shape.macs - plan.layer_macs(c.name, c.shape)
                                             for c in candidates if c.name in plan.ranks)
    plan.predicted_ms = (before, after)
    return plan


def spatial_plan(candidates: list[RankCandidate], spectra: dict[str, np.ndarray] | None, fixed_macs: int,
                 speedup: float, multiple: int) -> ArchitecturePlan:
    """Jaderberg et al.'s spatial split of every k x k layer (k > 1); 1-wide kernels stay as they are."""
    split = [RankCandidate(c.name, c.shape, "spatial") for c in candidates if has_spatial_extent(c.shape)]
    kept = {c.name: NO_SPATIAL_KERNEL for c in candidates if not has_spatial_extent(c.shape)}
    if not split:
        raise InfeasibleTargetError("no conv has a k x k kernel with k > 1 to split spatially",
                                    hint="use a channel method (--method asymmetric or svd)")
    fixed = fixed_macs + sum(c.shape.macs for c in candidates if c.name in kept)
    plan = ArchitecturePlan.from_ranks(_rank_plan(split, spectra, fixed, speedup, multiple), spatial=True)
    plan.skipped.update(kept)
    return plan


def three_d_plan(candidates: list[RankCandidate], spectra: dict[str, np.ndarray] | None, fixed_macs: int,
                 speedup: float, multiple: int, channel_speedup: float | None = None,
                 channel_only: tuple[str, ...] = (),
                 losses: dict[str, dict[int, float]] | None = None) -> ArchitecturePlan:
    """The paper's "asymmetric (3d)" architecture (§3.5); see the module docstring. The channel
    ranks are selected as by ``channel_plan``. Without a given ``channel_speedup`` the channel part
    starts at sqrt(r) and does more where the split alone cannot make up the rest (a selection that
    keeps many layers whole leaves the split too little to cut)."""
    speedup = validate_speedup(speedup)
    if channel_speedup is not None:
        channel_speedup = validate_speedup(channel_speedup)
        if channel_speedup > speedup:
            raise InvalidOptionError(f"the channel speedup ({channel_speedup:.3g}x) exceeds the target "
                                     f"({speedup:.3g}x)", hint="give a --channel-speedup between 1 and --speedup")
        return _three_d_at(candidates, spectra, fixed_macs, speedup, multiple, channel_speedup, channel_only, losses)
    *shares, last = np.linspace(0.5, 1.0, 6)  # the channel part's share of log(r), from the paper's sqrt(r) up
    for share in shares:
        try:
            return _three_d_at(candidates, spectra, fixed_macs, speedup, multiple, float(speedup ** share),
                               channel_only, losses)
        except InfeasibleTargetError:
            continue
    return _three_d_at(candidates, spectra, fixed_macs, speedup, multiple, float(speedup ** last), channel_only,
                       losses)


def _three_d_at(candidates, spectra, fixed_macs, speedup, multiple, channel_speedup, channel_only,
                losses) -> ArchitecturePlan:
    plan = channel_plan(candidates, spectra, fixed_macs, channel_speedup, multiple, losses)
    plan.channel_speedup = channel_speedup
    shapes = {c.name: c.shape for c in candidates}
    if channel_only:  # these get the ranks channel-only decomposition would give them for the whole target
        alone = channel_plan(candidates, spectra, fixed_macs, speedup, multiple, losses)
        for name in channel_only:
            plan.ranks.pop(name, None)
            plan.skipped.pop(name, None)
            if name in alone.ranks:
                plan.ranks[name] = alone.ranks[name]
            elif name in alone.skipped:
                plan.skipped[name] = alone.skipped[name]
        plan.macs_after = (fixed_macs + sum(c.shape.macs for c in candidates if c.name not in plan.ranks)
                           + sum(decomposed_macs(shapes[n], r, "channel") for n, r in plan.ranks.items()))
    target = plan.macs_before / speedup
    split = [RankCandidate(name, shapes[name].with_out_channels(rank), "spatial")
             for name, rank in plan.ranks.items() if has_spatial_extent(shapes[name]) and name not in channel_only]
    for name in plan.ranks:
        if not has_spatial_extent(shapes[name]):
            plan.notes[name] = f"channel-only: {NO_SPATIAL_KERNEL}"
        elif name in channel_only:
            plan.notes[name] = KEPT_CHANNEL_ONLY
    if plan.macs_after <= target:
        return plan
    if not split:  # a channel part short of the target and nothing to split: never a plan that misses it
        raise InfeasibleTargetError(f"a {speedup:.4g}x speedup needs more than the {channel_speedup:.3g}x channel "
                                    "part, and no decomposed layer has a k x k kernel to split",
                                    hint="raise --channel-speedup, or use --method asymmetric")
    # the k x k parts of the split layers are what the spatial step can still cut
    fixed = plan.macs_after - sum(c.shape.macs for c in split)
    try:
        spatial = uniform_ranks(split, fixed, plan.macs_after / target, multiple, leave_first=False)
    except InfeasibleTargetError as exc:
        raise InfeasibleTargetError(
            f"a {speedup:.4g}x conv speedup cannot be reached with a {channel_speedup:.3g}x channel part",
            hint="ask for less, or raise --channel-speedup so the channel part does more") from exc
    plan.spatial_ranks = dict(spatial.ranks)
    for name, reason in spatial.skipped.items():
        plan.notes[name] = f"channel-only: the spatial split {reason.split(':', 1)[0]}"
    plan.macs_after = spatial.macs_after
    return plan


def tucker2_plan(candidates: list[RankCandidate], fixed_macs: int, speedup: float, multiple: int) -> ArchitecturePlan:
    """One cost ratio for every layer (but the first), ``r1 / c = r2 / d``; rounding carried over."""
    speedup = validate_speedup(speedup)
    plan = ArchitecturePlan(macs_before=fixed_macs + sum(c.shape.macs for c in candidates))
    active = leave_first_conv(plan, list(candidates))
    options = {c.name: _tucker2_options(c.shape, multiple) for c in active}
    for cand in list(active):
        if not options[cand.name]:
            plan.skipped[cand.name] = f"cannot pay off: Tucker-2 at the minimum ranks {multiple} costs as much as the original"
            active.remove(cand)
    if not active:
        raise InfeasibleTargetError("no layer can be decomposed profitably", hint="see the skipped layers in the report")
    target = plan.macs_before / speedup
    kept = plan.macs_before - sum(c.shape.macs for c in active)
    ratio = (target - kept) / sum(c.shape.macs for c in active)
    choice, carry = {}, 0.0
    for cand in active:  # options are sorted by cost; take the dearest within the wanted cost
        wanted = ratio * cand.shape.macs + carry
        affordable = [i for i, (cost, _, _) in enumerate(options[cand.name]) if cost <= wanted]
        choice[cand.name] = affordable[-1] if affordable else 0
        carry = wanted - options[cand.name][choice[cand.name]][0]
    total = kept + sum(options[n][i][0] for n, i in choice.items())
    while total > target:
        lowerable = [n for n, i in choice.items() if i > 0]
        if not lowerable:
            raise InfeasibleTargetError(f"a {speedup:.4g}x conv speedup cannot be reached with Tucker-2",
                                        hint=f"the minimum ranks give {plan.macs_before / total:.3g}x; ask for less "
                                             "or lower --rank-multiple")
        name = max(lowerable, key=lambda n: options[n][choice[n]][0] - options[n][choice[n] - 1][0])
        total -= options[name][choice[name]][0] - options[name][choice[name] - 1][0]
        choice[name] -= 1
    for name, index in choice.items():
        _, plan.input_ranks[name], plan.ranks[name] = options[name][index]
    plan.macs_after = int(total)
    return plan


def _tucker2_options(shape: ConvShape, multiple: int) -> list[tuple[int, int, int]]:
    """(cost, r1, r2) below the original's cost, with r2 on multiples and r1 / c = r2 / d, cheapest first."""
    c, d = shape.in_channels, shape.out_channels
    options = set()
    for out_rank in range(multiple, d + 1, multiple):
        in_rank = min(c, max(multiple, int(round(out_rank * c / d / multiple)) * multiple))
        cost = tucker2_macs(shape, in_rank, out_rank)
        if cost < shape.macs:
            options.add((cost, in_rank, out_rank))
    return sorted(options)


def _rank_plan(candidates, spectra, fixed_macs, speedup, multiple, losses=None) -> RankPlan:
    if losses is not None:
        return measured_ranks(candidates, losses, fixed_macs, speedup, multiple)
    if spectra is None:
        return uniform_ranks(candidates, fixed_macs, speedup, multiple)
    return energy_ranks(candidates, spectra, fixed_macs, speedup, multiple)
