"""Rank selection and the cost model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.errors import InfeasibleTargetError
from onnx_lowrank.planning.costs import ConvShape, break_even_rank, decomposed_macs
from onnx_lowrank.planning.ranks import FIRST_LAYER_REASON, RankCandidate, energy_ranks, uniform_ranks


def channel_macs(shape: ConvShape, rank: int) -> int:
    return decomposed_macs(shape, rank, "channel")


def vgg_like() -> list[RankCandidate]:
    spec = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56),
            (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 28), (512, 512, 14), (512, 512, 14)]
    return [RankCandidate(f"conv{i}", ConvShape(c, d, (3, 3), (s, s))) for i, (c, d, s) in enumerate(spec)]


def test_break_even_rank_matches_brute_force() -> None:
    for c, d, k in [(3, 64, 3), (64, 64, 3), (16, 16, 1), (256, 512, 3), (32, 8, 5)]:
        shape = ConvShape(c, d, (k, k), (7, 7))
        cheaper = [r for r in range(1, d + 1) if channel_macs(shape, r) < shape.macs]
        assert break_even_rank(shape) == (max(cheaper) + 1 if cheaper else 1)


def test_decomposed_cost_counts_both_layers() -> None:
    shape = ConvShape(64, 128, (3, 3), (10, 10))
    assert channel_macs(shape, 32) == 100 * (32 * 64 * 9 + 128 * 32)


@pytest.mark.parametrize("speedup", [2, 3, 4, 5])
@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_uniform_ranks_meet_the_target(speedup: float, multiple: int) -> None:
    candidates = vgg_like()
    plan = uniform_ranks(candidates, fixed_macs=0, speedup=speedup, multiple=multiple)
    assert plan.macs_after <= plan.macs_before / speedup
    assert plan.speedup < speedup * 1.15  # close to the target, not far beyond it
    assert plan.skipped == {"conv0": FIRST_LAYER_REASON}
    shapes = {c.name: c.shape for c in candidates}
    for name, rank in plan.ranks.items():
        assert rank % multiple == 0 and 1 <= rank < break_even_rank(shapes[name])


def test_rounded_ranks_stay_within_two_steps_of_the_unrounded_ones() -> None:
    exact = uniform_ranks(vgg_like(), 0, 4, multiple=1)
    rounded = uniform_ranks(vgg_like(), 0, 4, multiple=16)
    assert exact.ranks.keys() == rounded.ranks.keys()
    assert all(abs(exact.ranks[n] - rounded.ranks[n]) <= 32 for n in exact.ranks)
    assert rounded.speedup == pytest.approx(exact.speedup, rel=0.05)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 512), st.integers(1, 512), st.sampled_from([1, 3, 5]),
                          st.integers(1, 64)), min_size=2, max_size=8),
       st.floats(1.2, 6.0), st.sampled_from([1, 4, 16]), st.integers(0, 10**7))
def test_uniform_ranks_never_exceed_the_budget(layers, speedup, multiple, fixed) -> None:
    candidates = [RankCandidate(f"l{i}", ConvShape(c, d, (k, k), (s, s))) for i, (c, d, k, s) in enumerate(layers)]
    try:
        plan = uniform_ranks(candidates, fixed, speedup, multiple)
    except InfeasibleTargetError:
        return
    assert plan.macs_after <= plan.macs_before / speedup + 1e-6
    assert set(plan.ranks) | set(plan.skipped) == {c.name for c in candidates}
    recomputed = fixed + sum(channel_macs(c.shape, plan.ranks[c.name]) if c.name in plan.ranks
                             else c.shape.macs for c in candidates)
    assert recomputed == plan.macs_after


def test_unreachable_speedup_names_what_is_reachable() -> None:
    with pytest.raises(InfeasibleTargetError, match="cannot be reached.*hint: with every decomposable layer"):
        uniform_ranks(vgg_like(), 0, 1000)


def test_layers_that_cannot_pay_off_are_left_alone() -> None:
    candidates = [RankCandidate("first", ConvShape(3, 64, (3, 3), (32, 32))),
                  RankCandidate("tiny", ConvShape(8, 8, (1, 1), (32, 32))),
                  RankCandidate("big", ConvShape(128, 128, (3, 3), (32, 32)))]
    plan = uniform_ranks(candidates, 0, 2)
    assert "cannot pay off" in plan.skipped["tiny"]
    assert list(plan.ranks) == ["big"]


@pytest.mark.parametrize("speedup", [0.5, 1, 1.0, -3, float("nan"), "4"])
def test_invalid_speedups(speedup) -> None:
    with pytest.raises(ValueError, match="speedup must be a number greater than 1"):
        uniform_ranks(vgg_like(), 0, speedup)


def test_invalid_rank_multiple() -> None:
    with pytest.raises(ValueError, match="rank multiple"):
        uniform_ranks(vgg_like(), 0, 2, multiple=0)


def decaying_spectra(candidates: list[RankCandidate], seed: int = 0) -> dict[str, np.ndarray]:
    """Each layer's PCA eigenvalues decay at its own rate, as in a real network."""
    rng = np.random.default_rng(seed)
    spectra = {}
    for cand in candidates:
        d = cand.shape.out_channels
        spectra[cand.name] = np.exp(-np.arange(d) / (d * rng.uniform(0.03, 0.4)))
    return spectra


def log_energy(plan, spectra) -> float:
    return sum(np.log(spectra[name][:rank].sum() / spectra[name].sum()) for name, rank in plan.ranks.items())


@pytest.mark.parametrize("speedup", [2, 3, 4, 5])
@pytest.mark.parametrize("multiple", [1, 16])
def test_energy_selection_meets_the_target_with_rounded_ranks(speedup: float, multiple: int) -> None:
    candidates = vgg_like()
    plan = energy_ranks(candidates, decaying_spectra(candidates), 0, speedup, multiple)
    shapes = {c.name: c.shape for c in candidates}
    recomputed = sum(channel_macs(shapes[n], r) for n, r in plan.ranks.items()) + sum(
        shapes[n].macs for n in plan.skipped)
    assert recomputed == plan.macs_after <= plan.macs_before / speedup
    assert plan.speedup < speedup * 1.1
    assert all(r % multiple == 0 and channel_macs(shapes[n], r) < shapes[n].macs
               for n, r in plan.ranks.items())


@pytest.mark.parametrize("seed", range(5))
def test_energy_selection_keeps_more_energy_than_uniform(seed: int) -> None:
    """Eq. 13's objective: the greedy plan keeps a larger product of energies at the same cost."""
    candidates = vgg_like()
    spectra = decaying_spectra(candidates, seed)
    uniform = uniform_ranks(candidates, 0, 4.0, 16)
    selected = energy_ranks(candidates, spectra, 0, 4.0, 16)
    assert selected.macs_after <= uniform.macs_before / 4.0
    assert log_energy(selected, spectra) > log_energy(uniform, spectra)


def test_energy_selection_cuts_concentrated_layers_deeper() -> None:
    shape = ConvShape(128, 128, (3, 3), (28, 28))
    candidates = [RankCandidate("first", shape), RankCandidate("flat", shape), RankCandidate("peaked", shape)]
    spectra = {"first": np.ones(128), "flat": np.linspace(1.0, 0.5, 128), "peaked": 0.8 ** np.arange(128.0)}
    plan = energy_ranks(candidates, spectra, 0, 2.0, 8)
    assert plan.ranks["peaked"] < plan.ranks["flat"]


def test_energy_selection_refuses_an_unreachable_target() -> None:
    candidates = vgg_like()
    with pytest.raises(InfeasibleTargetError, match="cannot be reached"):
        energy_ranks(candidates, decaying_spectra(candidates), 0, 500.0, 16)
