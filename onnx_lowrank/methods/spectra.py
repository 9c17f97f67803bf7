"""The energy spectra rank selection weighs (Eq. 13-14), per layer: of the responses for the
data-driven methods, of the weights for the baselines; per group for a grouped conv."""

from __future__ import annotations

import numpy as np

from onnx_lowrank.graph.units import Unit
from onnx_lowrank.planning.costs import max_rank
from onnx_lowrank.planning.ranks import RankCandidate
from onnx_lowrank.solvers import ResponseStats
from onnx_lowrank.solvers.grouped import group_slices, group_stats, interleaved_spectrum
from onnx_lowrank.solvers.weights import weight_spectrum


def response_spectrum(unit: Unit, stats: ResponseStats) -> np.ndarray:
    """The PCA energy spectrum rank selection weighs: per group for a grouped conv (solvers.grouped)."""
    if unit.group == 1:
        return stats.eigenvalues
    return interleaved_spectrum([part.eigenvalues for part in group_stats(stats, unit.group)])


def weights_spectrum(unit: Unit, scheme: str) -> np.ndarray:
    if unit.group == 1:
        return weight_spectrum(unit.weight, scheme)
    return interleaved_spectrum([weight_spectrum(unit.weight[part], scheme)
                                 for part in group_slices(unit.weight.shape[0], unit.group)])


def padded(spectrum: np.ndarray, candidate: RankCandidate, scheme: str) -> np.ndarray:
    """A spectrum of the candidate's full rank: directions the weights do not span have energy 0."""
    full = max_rank(candidate.shape, scheme)
    return np.concatenate([spectrum, np.zeros(max(0, full - len(spectrum)))])[:full]
