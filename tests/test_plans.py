"""Architecture plans of the 3d method and the baselines: exact costs, targets met, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.errors import InfeasibleTargetError, InvalidOptionError
from onnx_lowrank.planning.costs import ConvShape, break_even_rank, decomposed_macs, tucker2_macs
from onnx_lowrank.planning.plans import (
    KEPT_CHANNEL_ONLY,
    NO_SPATIAL_KERNEL,
    channel_plan,
    spatial_plan,
    three_d_plan,
    tucker2_plan,
)
from onnx_lowrank.planning.ranks import FIRST_LAYER_REASON, RankCandidate


def vgg_like(strided: bool = False) -> list[RankCandidate]:
    spec = [(3, 64, 3, 32), (64, 64, 3, 32), (64, 128, 3, 16), (128, 128, 3, 16), (128, 256, 1, 8),
            (256, 256, 3, 8), (256, 256, 3, 8)]
    candidates = []
    for i, (c, d, k, s) in enumerate(spec):
        in_hw = (2 * s, 2 * s) if strided and i in (2, 4) else None
        candidates.append(RankCandidate(f"conv{i}", ConvShape(c, d, (k, k), (s, s), in_hw=in_hw)))
    return candidates


def spectra(candidates: list[RankCandidate], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c.name: np.sort(rng.exponential(size=c.shape.out_channels) ** 3)[::-1] for c in candidates}


def planned_total(plan, candidates: list[RankCandidate]) -> int:
    """The cost recomputed layer by layer: a decomposed layer at its chain's cost, others unchanged."""
    return sum(plan.layer_macs(c.name, c.shape) if c.name in plan.layers else c.shape.macs for c in candidates)


def test_spatial_cost_counts_the_vertical_conv_on_every_input_column() -> None:
    shape = ConvShape(16, 32, (3, 5), (7, 9), in_hw=(14, 18))  # stride 2
    vertical = 7 * 18 * 16 * 3  # (3 x 1, stride (2, 1)) output is 7 x 18
    horizontal = 7 * 9 * 32 * 5  # (1 x 5, stride (1, 2)) output is 7 x 9
    assert decomposed_macs(shape, 10, "spatial") == 10 * (vertical + horizontal)
    assert tucker2_macs(shape, 4, 6) == 14 * 18 * 16 * 4 + 7 * 9 * (15 * 4 * 6 + 6 * 32)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_break_even_rank_matches_brute_force(scheme: str) -> None:
    for c, d, k, in_hw in ((3, 64, 3, None), (64, 64, 3, None), (32, 128, 5, (14, 14)), (256, 16, 3, None)):
        shape = ConvShape(c, d, (k, k), (7, 7), in_hw=in_hw)
        cheaper = [r for r in range(1, 4 * max(c, d)) if decomposed_macs(shape, r, scheme) < shape.macs]
        assert break_even_rank(shape, scheme) == (max(cheaper) + 1 if cheaper else 1)


@pytest.mark.parametrize("speedup", [2.0, 3.0, 4.0, 5.0])
@pytest.mark.parametrize("energy", [False, True])
def test_three_d_plan_meets_the_target_with_each_part_near_sqrt_r(speedup: float, energy: bool) -> None:
    candidates = vgg_like(strided=True)
    plan = three_d_plan(candidates, spectra(candidates) if energy else None, 0, speedup, 16)
    assert planned_total(plan, candidates) == plan.macs_after
    assert plan.speedup >= speedup
    channel = channel_plan(candidates, spectra(candidates) if energy else None, 0, np.sqrt(speedup), 16)
    assert plan.ranks == channel.ranks  # the channel part is the plan for sqrt(r)
    assert channel.speedup >= np.sqrt(speedup)
    for name, spatial in plan.spatial_ranks.items():
        shape = next(c.shape for c in candidates if c.name == name).with_out_channels(plan.ranks[name])
        assert spatial % 16 == 0 and 16 <= spatial < break_even_rank(shape, "spatial")
    assert "conv4" not in plan.spatial_ranks
    assert "conv4" not in plan.ranks or NO_SPATIAL_KERNEL in plan.notes["conv4"]
    assert plan.skipped["conv0"] == FIRST_LAYER_REASON


def test_three_d_plan_takes_its_channel_ranks_from_measured_losses() -> None:
    """With sensitivity the channel part is the measured-loss plan for sqrt(r): conv5, whose
    losses are flat (any rank is free), gets the smallest rank on the grid."""
    candidates = vgg_like()
    losses = {c.name: {r: (0.0 if c.name == "conv5" else (1 - r / c.shape.out_channels) ** 2)
                       for r in range(16, c.shape.out_channels + 1, 16)} for c in candidates[1:]}
    plan = three_d_plan(candidates, None, 0, 3.0, 16, losses=losses)
    assert plan.speedup >= 3.0 and planned_total(plan, candidates) == plan.macs_after
    assert plan.ranks == channel_plan(candidates, None, 0, np.sqrt(3.0), 16, losses=losses).ranks
    assert plan.ranks["conv5"] == 16 and plan.spatial_ranks


def test_three_d_plan_lets_the_channel_part_do_more_when_the_split_cannot_make_up_the_rest() -> None:
    """Free ranks in conv5 and steep losses elsewhere keep conv1, conv2 and conv4 whole at a
    sqrt(4) = 2x channel part; the split of the rest cannot reach 4x from there, so the channel
    part does more."""
    candidates = vgg_like()
    losses = {c.name: {r: (0.0 if c.name == "conv5" else 1.0 / r) for r in range(16, c.shape.out_channels + 1, 16)}
              for c in candidates[1:]}
    with pytest.raises(InfeasibleTargetError):
        three_d_plan(candidates, None, 0, 4.0, 16, channel_speedup=2.0, losses=losses)
    plan = three_d_plan(candidates, None, 0, 4.0, 16, losses=losses)
    assert plan.speedup >= 4.0 and planned_total(plan, candidates) == plan.macs_after
    assert 2.0 < plan.channel_speedup <= 4.0
    assert plan.ranks == channel_plan(candidates, None, 0, plan.channel_speedup, 16, losses=losses).ranks


def test_three_d_plan_keeps_named_layers_channel_only_and_still_meets_the_target() -> None:
    candidates = vgg_like()
    plan = three_d_plan(candidates, None, 0, 3.0, 16, channel_only=("conv5", "conv6"))
    assert "conv5" in plan.ranks and "conv5" not in plan.spatial_ranks
    assert plan.notes["conv6"] == KEPT_CHANNEL_ONLY
    assert plan.speedup >= 3.0


def test_three_d_plan_refuses_an_unreachable_split() -> None:
    candidates = vgg_like()
    with pytest.raises(InfeasibleTargetError, match="channel part"):
        three_d_plan(candidates, None, 0, 12.0, 16, channel_speedup=1.2)
    with pytest.raises(InvalidOptionError, match="exceeds the target"):
        three_d_plan(candidates, None, 0, 2.0, 16, channel_speedup=3.0)


def test_spatial_plan_splits_only_kernels_wider_than_one() -> None:
    candidates = vgg_like(strided=True)
    plan = spatial_plan(candidates, None, 0, 3.0, 16)
    assert plan.skipped["conv4"] == NO_SPATIAL_KERNEL and not plan.ranks
    assert set(plan.spatial_ranks) == {"conv1", "conv2", "conv3", "conv5", "conv6"}
    assert planned_total(plan, candidates) == plan.macs_after and plan.speedup >= 3.0


def test_energy_spatial_plan_cuts_the_concentrated_spectrum_deeper() -> None:
    shape = ConvShape(64, 64, (3, 3), (16, 16))
    candidates = [RankCandidate(n, shape) for n in ("first", "flat", "peaked")]
    full = RankCandidate("x", shape, "spatial").full_rank
    values = {"first": np.ones(full), "flat": np.ones(full), "peaked": 0.5 ** np.arange(full)}
    plan = spatial_plan(candidates, values, 0, 2.0, 16)
    assert plan.spatial_ranks["peaked"] < plan.spatial_ranks["flat"]


@pytest.mark.parametrize("speedup", [2.0, 3.0, 4.0])
def test_tucker2_plan_meets_the_target_with_proportional_ranks(speedup: float) -> None:
    candidates = vgg_like(strided=True)
    plan = tucker2_plan(candidates, 0, speedup, 16)
    assert planned_total(plan, candidates) == plan.macs_after and plan.speedup >= speedup
    for cand in candidates[1:]:
        if cand.name in plan.ranks:
            r1, r2 = plan.input_ranks[cand.name], plan.ranks[cand.name]
            assert r1 % 16 == 0 and r2 % 16 == 0
            assert abs(r1 / cand.shape.in_channels - r2 / cand.shape.out_channels) <= 16 / cand.shape.in_channels
