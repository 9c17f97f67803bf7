"""Solving the chosen layers: the data-driven chains shallow to deep (with the Eq. 12 re-collection
of each layer's input in the already-approximated network), and the data-free baselines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from onnx_lowrank.errors import InternalError
from onnx_lowrank.graph.rewrite import (
    NodeSpec,
    channel_chain,
    channel_decomposition,
    tucker2_decomposition,
)
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.methods.carried import CarriedCut, CutSizes
from onnx_lowrank.methods.split_basis import KEY as BASIS
from onnx_lowrank.methods.split_basis import SplitBasis, beside_outputs, collect_bases, lacking, spatial_pair
from onnx_lowrank.planning.plans import ArchitecturePlan
from onnx_lowrank.registry import Solver
from onnx_lowrank.solvers import LowRankFactors, ResponseStats, fit_pca
from onnx_lowrank.solvers.activations import apply_activation, relative_error
from onnx_lowrank.solvers.grouped import fit_per_group, part_stats
from onnx_lowrank.solvers.nonlinear import PAPER_SCHEDULE, closed_form_from_moments, fit_nonlinear
from onnx_lowrank.solvers.weights import (
    tucker2,
    weight_svd,
)

# For chains that rank plans rather than ship (budget probes, sensitivity): a fifth of the paper's
# schedule comes within a few per cent of its error (the solver gains most in its first iterations).
PROBE_SCHEDULE = ((0.01, 5), (1.0, 5))
# The solver's closed-form start alone (the reduced-rank regression, Eq. 12 without iterations):
# what a budget search's probes of a 3d plan use; the search corrects for the gap to the method.
CLOSED_FORM = ()
ERROR_SAMPLES = 4096  # samples a layer's reported response error is computed on


@dataclass
class Solved:
    """What solving the chosen layers produced, per layer name."""

    chains: dict[str, list[NodeSpec]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, list[int] | None] = field(default_factory=dict)
    prefix_macs: int = 0  # conv MACs per sample of the sub-graphs re-run for Eq. 12
    timings: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # per layer: "solve", "collect"


def data_free_chains(solver: Solver, chosen: list[Unit], plan: ArchitecturePlan) -> Solved:
    """The baselines: each layer's chain from its weights alone."""
    solved = Solved()
    clock = time.perf_counter()
    for unit in chosen:
        if solver is Solver.WEIGHT_SVD:
            factors = fit_per_group(unit.weight.shape[0], unit.group, plan.ranks[unit.name],
                                    lambda part, rank: weight_svd(unit.weight[part], unit.bias[part], rank))
            chain = channel_chain(unit, factors.P, factors.Q, factors.bias)
        elif solver is Solver.SPATIAL_FILTERS:
            chain = spatial_pair(unit, plan.spatial_ranks[unit.name])
        elif solver is Solver.TUCKER2:
            chain = tucker2_decomposition(unit.attrs, *tucker2(unit.weight, plan.input_ranks[unit.name],
                                                              plan.ranks[unit.name]), unit.bias)
        else:
            raise InternalError(f"{solver} is not a data-free solver")
        solved.chains[unit.name] = chain
    solved.timings["solve"] = time.perf_counter() - clock
    return solved


def solve_layers(solver: Solver, asymmetric, normalised, chosen, plan: ArchitecturePlan, responses, stats, shapes,
                 collect, advance, cache: dict | None = None, schedule=PAPER_SCHEDULE,
                 cuts: CutSizes | None = None) -> Solved:
    """Solve the chosen layers shallow to deep. The fitted input ``W x-hat`` is the output of the
    layer in a network where (with ``asymmetric``, Eq. 12) the earlier layers are already replaced
    and (for a 3d layer, §3.5) the layer itself is split spatially; the target is always the
    original network's response. With Eq. 12 the network runs again up to the layer, from the
    values kept at an earlier one (``methods.carried``); without it, one run of the network gives
    every split layer's output; PCA (Eq. 4) reads the responses alone. ``responses`` are
    consumed, unless a ``cache`` is given: then they are kept, and the chains that depend on
    nothing but the layer's own ranks (PCA's, and every symmetric one) are kept in it by (layer,
    ranks, solver, schedule), so that plans sharing a layer's ranks solve it once, and a
    symmetric 3d solve's split outputs come from the layers' bases kept in it
    (``methods.split_basis``). ``cuts``: the sizes of the values Eq. 12 may carry from layer to layer
    (``methods.carried``; without them, every layer's input runs from the network's inputs)."""
    solved = Solved(timings={"collect_asymmetric": 0.0, "solve": 0.0})
    # Without Eq. 12 a layer's chain depends on its own ranks alone: solved once for all plans.
    independent = cache is not None and (solver is Solver.PCA or not asymmetric)

    def key(unit: Unit) -> tuple:
        return unit.name, plan.ranks[unit.name], plan.spatial_ranks.get(unit.name), solver, schedule

    to_solve = [u for u in chosen if not (independent and key(u) in cache)]
    clock = time.perf_counter()
    pairs = {u.name: spatial_pair(u, plan.spatial_ranks[u.name], cache) for u in to_solve
             if u.name in plan.spatial_ranks}
    solved.timings["solve"] += time.perf_counter() - clock
    split_outputs = {} if asymmetric or solver is Solver.PCA else _split_outputs(
        normalised, to_solve, pairs, collect, shapes, solved, cache)
    carried = CarriedCut(normalised, collect, cuts or CutSizes({}, 0))
    for unit in chosen:
        y = responses[unit.output] if cache is not None else responses.pop(unit.output)
        y_hat = split_outputs.pop(unit.name, y)
        if independent and key(unit) in cache:
            solved.chains[unit.name], solved.errors[unit.name], solved.iterations[unit.name] = cache[key(unit)]
            advance(1)
            continue
        spatial = pairs.get(unit.name)
        collecting = time.perf_counter()
        if asymmetric and solver is not Solver.PCA:
            y_hat = _refitted_input(unit, y, carried, solved, spatial, shapes)
        clock = time.perf_counter()
        factors, solved.iterations[unit.name], solved.errors[unit.name] = _fit(
            solver, unit, stats[unit.name], y_hat, y, spatial, plan.ranks[unit.name], schedule)
        if spatial is None:
            solved.chains[unit.name] = channel_chain(unit, factors.P, factors.Q, factors.bias)
        else:
            vertical, horizontal = spatial
            solved.chains[unit.name] = [vertical] + channel_decomposition(
                horizontal.attrs, horizontal.weight, horizontal.bias, factors.P, factors.Q, factors.bias)
        if independent:
            cache[key(unit)] = solved.chains[unit.name], solved.errors[unit.name], solved.iterations[unit.name]
        solved.timings["solve"] += time.perf_counter() - clock
        solved.seconds[unit.name] = {"collect": round(clock - collecting, 3), "solve": round(time.perf_counter() - clock, 3)}
        advance(1)
    return solved


def _split_outputs(normalised, units: list[Unit], pairs: dict[str, list[NodeSpec]], collect, shapes,
                   solved: Solved, cache: dict | None) -> dict[str, np.ndarray | SplitBasis]:
    """Each spatially split layer's output on the original network's inputs (the symmetric 3d
    solve), sampled as the layer's own responses, from one run of the network with every split
    beside its layer rather than one sub-graph run per layer. With a ``cache`` (a search's
    probes), the layers' bases kept in it instead (``methods.split_basis``): the network runs only
    for layers without one of a high enough rank."""
    if not pairs:
        return {}
    clock = time.perf_counter()
    missing = pairs if cache is None else {name: pairs[name] for name in lacking(
        {name: pair[0].weight.shape[0] for name, pair in pairs.items()}, cache)}
    if cache is None:
        split_outputs = beside_outputs(normalised, pairs, {u.name: u.output for u in units}, collect)
    else:
        if missing:
            collect_bases(normalised, missing, {u.name: u.output for u in units}, collect, cache)
        split_outputs = {name: cache[(BASIS, name)] for name in pairs}  # their products as the solve needs them
    if missing:
        solved.prefix_macs += sum(shape.macs for shape in shapes.values())
    solved.timings["collect_asymmetric"] += time.perf_counter() - clock
    return split_outputs


def _refitted_input(unit: Unit, y: np.ndarray, carried: CarriedCut, solved: Solved, spatial, shapes) -> np.ndarray:
    """The layer's output where the earlier chains (Eq. 12) and its own spatial split (§3.5)
    replace the original's (``methods.carried``); the original's responses where nothing is yet."""
    clock = time.perf_counter()
    replaced = dict(solved.chains)
    if spatial is not None:
        replaced[unit.name] = spatial
    if replaced:
        y, macs = carried.layer_output(unit, replaced, shapes)
        solved.prefix_macs += macs
    solved.timings["collect_asymmetric"] += time.perf_counter() - clock
    return y


def _fit(solver: Solver, unit: Unit, stats: ResponseStats, y_hat: np.ndarray | SplitBasis, y: np.ndarray, spatial,
         rank: int, schedule) -> tuple[LowRankFactors, list[int] | None, float]:
    """The layer's factors (``_solve``), iterations and reported error; a 3d probe's closed form
    (``y_hat`` a split layer's basis) from the basis's moments, without its product with every sample."""
    rows = slice(None, None, -(-len(y) // ERROR_SAMPLES))  # the reported error's samples
    if isinstance(y_hat, SplitBasis) and schedule == CLOSED_FORM:
        factors = closed_form_from_moments(*y_hat.output_moments(spatial[1], y), rank)
        return factors, [], _response_error(unit, factors, y_hat.output(spatial[1], rows), y[rows])
    y_hat = y_hat.output(spatial[1]) if isinstance(y_hat, SplitBasis) else y_hat
    factors, iterations = _solve(solver, unit, stats, y_hat, y, rank, schedule)
    return factors, iterations, _response_error(unit, factors, y_hat[rows], y[rows])


def _response_error(unit: Unit, factors: LowRankFactors, y_hat: np.ndarray, y: np.ndarray) -> float:
    """The relative error of the layer's responses after its activation, on the samples given
    (evenly spaced, ``ERROR_SAMPLES`` at most: a figure for the report, at a fraction of the
    solve's cost where a layer has tens of thousands of samples)."""
    act = unit.activation
    return relative_error(apply_activation(act.kind, act.params, y),
                          apply_activation(act.kind, act.params, factors.apply(y_hat)))


def _solve(solver: Solver, unit: Unit, stats: ResponseStats, y_hat: np.ndarray, y: np.ndarray,
           rank: int, schedule=PAPER_SCHEDULE) -> tuple[LowRankFactors, list[int] | None]:
    """PCA (Eq. 4) for ``linear``; the alternating solver of Eq. 6 for the layer's activation
    otherwise, asymmetric (Eq. 12) when ``y_hat`` differs from ``y``; per group for a grouped conv
    (``solvers.grouped``). Also returns the solver's iterations per stage (None for PCA; the most
    any group took). The symmetric closed form (``CLOSED_FORM``, a probe's) is PCA itself, read
    from the statistics."""
    if solver is Solver.PCA or (y_hat is y and schedule == CLOSED_FORM):
        return fit_per_group(stats.dim, unit.group, rank, lambda part, part_rank: fit_pca(
            stats if unit.group == 1 else part_stats(stats, part), part_rank)), None
    act, iterations = unit.activation, []

    def fit(part: slice, part_rank: int) -> LowRankFactors:
        result = fit_nonlinear(y_hat[:, part], y[:, part], part_rank, act.kind, act.params, schedule=schedule)
        iterations.append(result.iterations)
        return result.factors

    factors = fit_per_group(y.shape[1], unit.group, rank, fit)
    return factors, [max(stage) for stage in zip(*iterations)]
