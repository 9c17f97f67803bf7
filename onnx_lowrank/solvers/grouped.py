"""Grouped layers (a conv with ``group = G``, not depthwise): one low-rank fit per group.

A grouped conv's output channels in group g only see that group's inputs, so its matrix is block
diagonal. Decomposing each group's ``d / G`` responses at rank ``r`` and putting the factors on
the diagonal keeps that structure: the chain is a grouped (k x k, c -> G r) conv then a grouped
(1 x 1, G r -> d) conv, costing ``1 / G`` of a dense chain of the same total rank ``R = G r``.
A dense chain (one fit over all d responses) would read every input channel and pays only at
ranks below ``d / G``; the per-group form is the one used. Pure NumPy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from onnx_lowrank.solvers.factors import LowRankFactors, ResponseStats


def group_slices(dim: int, groups: int) -> list[slice]:
    if groups < 1 or dim % groups:
        raise ValueError(f"{dim} channels do not split into {groups} groups")
    size = dim // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def part_stats(stats: ResponseStats, part: slice) -> ResponseStats:
    """The statistics of the channels ``part``: a diagonal block of the scatter matrix."""
    return ResponseStats.from_scatter(stats.mean[part], stats.scatter[part, part], stats.count)


def group_stats(stats: ResponseStats, groups: int) -> list[ResponseStats]:
    """Each group's response statistics."""
    return [part_stats(stats, part) for part in group_slices(stats.dim, groups)]


def fit_per_group(dim: int, groups: int, rank: int,
                  fit: Callable[[slice, int], LowRankFactors]) -> LowRankFactors:
    """``fit(group's channels, rank / G)`` for every group, assembled block-diagonally."""
    if rank % groups:
        raise ValueError(f"rank {rank} does not split into {groups} groups")
    per_group = rank // groups
    P, Q, bias = np.zeros((dim, rank)), np.zeros((dim, rank)), np.zeros(dim)
    for index, part in enumerate(group_slices(dim, groups)):
        factors = fit(part, per_group)
        columns = slice(index * per_group, (index + 1) * per_group)
        P[part, columns], Q[part, columns], bias[part] = factors.P, factors.Q, factors.bias
    return LowRankFactors(P, Q, bias)


def interleaved_spectrum(spectra: list[np.ndarray]) -> np.ndarray:
    """A spectrum over the total rank R whose energy at every multiple of G is what the per-group
    fits keep at rank R / G: entry ``G i + j`` is the mean of the groups' i-th eigenvalues."""
    stacked = np.stack([np.asarray(s, np.float64) for s in spectra])
    return np.repeat(stacked.mean(axis=0), len(spectra))
