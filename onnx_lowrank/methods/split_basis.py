"""The k x 1 / 1 x k split of a layer (§3.5's first step), and a budget search's 3d probes: a
layer's split output at every rank up to one, from one run of the network.

The filter reconstruction is nested (the rank-r split's vertical filters are the first r of a
higher rank's, and so are its horizontal ones: ``solvers.weights.spatial_filter_reconstruction``),
and the horizontal conv is linear in the vertical conv's outputs. So one run keeps, at each
sampled position, the vertical conv's outputs at every tap of the horizontal conv; the output of
a split of any lower rank there is one product with its horizontal weights, and a probe at ranks
the run covered runs no network."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnx_lowrank.graph.rewrite import NodeSpec, beside_units, spatial_decomposition
from onnx_lowrank.graph.surgery import prefix_model
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.planning.costs import max_rank
from onnx_lowrank.planning.sampling import images_per_batch
from onnx_lowrank.runtime.sessions import collect_responses
from onnx_lowrank.solvers.weights import filter_reconstruction_svd, spatial_filter_reconstruction

KEY = "split basis"  # a search's cache holds a layer's basis under (KEY, layer)


def spatial_pair(unit: Unit, rank: int, cache: dict | None = None) -> list[NodeSpec]:
    """The layer's (k x 1, rank) -> (1 x k, d) filter reconstruction, bias on the second conv;
    with a ``cache``, the layer's SVD is kept in it for the next rank."""
    svd = None
    if cache is not None:
        key = ("filter reconstruction svd", unit.name)
        if key not in cache:
            cache[key] = filter_reconstruction_svd(unit.weight)
        svd = cache[key]
    return spatial_decomposition(unit.attrs, *spatial_filter_reconstruction(unit.weight, rank, svd), unit.bias)


@dataclass
class SplitBasis:
    """At each sample of a layer, its split's first ``rank`` vertical outputs at each tap of the
    horizontal conv: ``values`` is ``(samples, rank * taps)``, tap-minor."""

    rank: int
    values: np.ndarray
    _moments: tuple | None = field(default=None, repr=False, compare=False)  # once, by output_moments

    def output(self, horizontal: NodeSpec, rows: slice = slice(None)) -> np.ndarray:
        """The split's output at the samples (``rows`` of them), for the ``horizontal`` conv of a
        split of rank at most ``rank``."""
        matrix = _matrix(horizontal)
        out = self.values[rows, :matrix.shape[1]] @ matrix.T.astype(np.float32)
        return out if horizontal.bias is None else out + horizontal.bias.astype(np.float32)

    def output_moments(self, horizontal: NodeSpec, responses: np.ndarray) -> tuple[np.ndarray, ...]:
        """The split's output's mean and scatter, the mean of ``responses`` (the layer's own, always
        the same) and their cross-moment with the output, from the basis's, computed once: a
        probe's closed form without a product with every sample
        (``solvers.nonlinear.closed_form_from_moments``)."""
        if self._moments is None:
            mean = self.values.mean(axis=0, dtype=np.float64)
            centred = self.values - mean.astype(np.float32)
            wide = centred.astype(np.float64)  # as the samples' own scatter: float64 keeps it positive semi-definite
            self._moments = (mean, wide.T @ wide, responses.mean(axis=0, dtype=np.float64),
                             (responses.T @ centred).astype(np.float64))
        mean, gram, target_mean, cross = self._moments
        matrix = _matrix(horizontal).astype(np.float64)
        width = matrix.shape[1]
        bias = np.zeros(len(matrix)) if horizontal.bias is None else horizontal.bias.astype(np.float64)
        return (matrix @ mean[:width] + bias, matrix @ gram[:width, :width] @ matrix.T, target_mean,
                cross[:, :width] @ matrix.T)


def _matrix(horizontal: NodeSpec) -> np.ndarray:
    """The horizontal conv's weight as ``d x (rank * taps)``, tap-minor like a basis's values."""
    weight = horizontal.weight
    return weight.reshape(weight.shape[0], weight.shape[1] * math.prod(weight.shape[2:]))


def tap_chain(split: list[NodeSpec]) -> list[NodeSpec]:
    """The split's vertical conv, then a grouped conv (the horizontal conv's strides, dilations
    and pads) that copies each vertical output to one channel per tap: its output sampled at a
    layer's positions is the layer's ``SplitBasis.values``."""
    vertical, horizontal = split
    rank, kernel = vertical.weight.shape[0], horizontal.weight.shape[2:]
    taps = math.prod(kernel)
    copy = np.zeros((rank, taps, taps), dtype=horizontal.weight.dtype)
    copy[:, np.arange(taps), np.arange(taps)] = 1
    return [vertical, NodeSpec(copy.reshape(rank * taps, 1, *kernel), None, {**horizontal.attrs, "group": rank})]


def basis_bytes(samples: dict[str, int], ranks: dict[str, int], shapes: dict) -> int:
    """What the bases of the layers at ``ranks`` take: a float per sample, rank and tap."""
    return sum(4 * samples[name] * rank * shapes[name].kernel[1] for name, rank in ranks.items())


def batch_for(ranks: dict[str, int], shapes: dict, preferred: int, budget: int) -> int:
    """Images per batch of a bases run whose tap outputs (each layer's rank x taps channels at
    its full output resolution) fit ``budget`` bytes: on CRAFT a batch of 8 held 5 GB more than
    the bases themselves, a batch of one 1.5 GB, and ran faster."""
    per_image = sum(4 * rank * shapes[name].kernel[1] * shapes[name].positions for name, rank in ranks.items())
    return images_per_batch(per_image, preferred, budget)


def lacking(ranks: dict[str, int], cache: dict) -> dict[str, int]:
    """The layers (with their split ranks) that have no basis in ``cache`` of that rank or higher."""
    return {name: rank for name, rank in ranks.items()
            if cache.get((KEY, name)) is None or cache[(KEY, name)].rank < rank}


def collect_bases(normalised, splits: dict[str, list[NodeSpec]], outputs: dict[str, str], collect: dict,
                  cache: dict) -> None:
    """One run of the network, as far as the deepest of the layers, with each split's
    ``tap_chain`` beside its layer, sampled as the layer's output (``outputs``, by layer): each
    layer's basis, at its split's rank, into ``cache``."""
    values = beside_outputs(prefix_model(normalised, [outputs[name] for name in splits]),
                            {name: tap_chain(split) for name, split in splits.items()}, outputs, collect)
    for name, split in splits.items():
        cache[(KEY, name)] = SplitBasis(split[0].weight.shape[0], values[name])


def beside_outputs(model, chains: dict[str, list[NodeSpec]], outputs: dict[str, str],
                   collect: dict) -> dict[str, np.ndarray]:
    """Each chain's output, run beside its layer from the same input (one run of ``model`` for
    all of them), sampled as the layer's output (``outputs``, by layer)."""
    beside, written = beside_units(model, chains)
    collected = collect_responses(beside, tensors=list(written.values()),
                                  sampled_as={tensor: outputs[name] for name, tensor in written.items()}, **collect)
    return {name: collected[tensor] for name, tensor in written.items()}


def keep_bases(normalised, units: dict[str, Unit], ranks: dict[str, int], shapes: dict, collect: dict,
               cache: dict, batch_bytes: int | None = None) -> None:
    """The bases of the layers (``units``, by name) at ``ranks`` that ``cache`` lacks, from one
    run of the network, in batches whose tap outputs fit ``batch_bytes`` (``batch_for``); a layer
    whose basis proved too small gets half again the rank asked (a plan's ranks are not monotone
    in its speedup)."""
    ranks = {name: min(max_rank(shapes[name], "spatial"), rank * 3 // 2) if (KEY, name) in cache else rank
             for name, rank in lacking(ranks, cache).items()}
    if ranks:
        if batch_bytes is not None:
            collect = {**collect, "batch_size": batch_for(ranks, shapes, collect["batch_size"], batch_bytes)}
        collect_bases(normalised, {name: spatial_pair(units[name], rank, cache) for name, rank in ranks.items()},
                      {name: units[name].output for name in ranks}, collect, cache)
