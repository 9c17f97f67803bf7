"""The accuracy budget: the fastest plan whose fidelity on held-out data meets it, measured with
the method itself; never a plan that misses it."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import pytest

from onnx_lowrank.errors import BudgetNotMetError, InvalidOptionError
from onnx_lowrank.methods.chains import PROBE_SCHEDULE
from onnx_lowrank.pipeline import search
from onnx_lowrank.pipeline.budget import Budget
from onnx_lowrank.pipeline.search import compress_to_budget
from onnx_lowrank.planning import bracket
from onnx_lowrank.registry import METHODS
from onnx_lowrank.solvers.nonlinear import PAPER_SCHEDULE
from tests.builders import Layer, conv_net, run_model
from tests.test_cli import invoke

pytestmark = pytest.mark.slow  # end-to-end budget searches / many generated graphs


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return conv_net([Layer(16), Layer(64), Layer(64), Layer(32)], size=(10, 10), classifier=10, seed=3)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((100, 3, 10, 10)).astype(np.float32)


def held_out_error(model, optimized, data) -> float:
    """The output error on the held-out block (the last 20 rows of an array), computed here."""
    x = data[80:]
    reference, approx = run_model(model, {"input": x})[0], run_model(optimized, {"input": x})[0]
    return float(np.linalg.norm(reference - approx) / np.linalg.norm(reference))


@pytest.mark.parametrize("limit", [0.02, 0.1])
def test_the_answer_meets_the_budget_and_is_the_fastest_that_did(model, data, limit) -> None:
    result = compress_to_budget(model, Budget("error", limit), calibration=data, bench=False, rank_multiple=8,
                                threads=1)
    report = result.report
    measured = held_out_error(model, result.model, data)
    assert measured <= limit and report.budget["measured"] == pytest.approx(measured, rel=1e-4)
    method_points = [p for p in report.frontier if p.solver == "asymmetric"]
    assert all(p.met == (p.value <= limit) for p in report.frontier if p.value is not None)
    chosen = report.theoretical_speedup
    assert any(p.met and p.theoretical_speedup == pytest.approx(chosen) for p in method_points)
    assert not any(p.met and p.theoretical_speedup > chosen for p in method_points)
    assert any(not p.met for p in report.frontier)  # the search looked past what it chose


def test_a_looser_budget_buys_more_speed(model, data) -> None:
    speeds = [compress_to_budget(model, Budget("error", limit), calibration=data, bench=False, rank_multiple=8,
                                 threads=1).report.theoretical_speedup for limit in (0.02, 0.2)]
    assert speeds[1] > speeds[0]


def test_agreement_and_drop_budgets(model, data) -> None:
    labels = run_model(model, {"input": data})[0].argmax(1)  # the original is always right
    evaluation = {"input": data[80:], "labels": labels[80:]}
    result = compress_to_budget(model, Budget("drop", 5.0), calibration=data[:80], evaluation=evaluation,
                                bench=False, rank_multiple=8, threads=1)
    fidelity = result.report.fidelity
    assert 100 * (fidelity.accuracy_original - fidelity.accuracy_optimized) <= 5.0
    agreement = compress_to_budget(model, Budget("agreement", 0.95), calibration=data, bench=False,
                                   rank_multiple=8, threads=1).report
    assert agreement.fidelity.top1_agreement >= 0.95 and agreement.budget["measured"] >= 0.95


def test_a_budget_every_plan_meets_is_answered_at_the_fastest_feasible_plan_with_no_quick_run(model, data) -> None:
    report = compress_to_budget(model, Budget("error", 10.0), calibration=data, bench=False, rank_multiple=8,
                                threads=1).report
    solvers = [p.solver for p in report.frontier]
    fastest_probe = max(p.theoretical_speedup for p in report.frontier if p.solver == "probe")
    assert "infeasible" in solvers and "asymmetric (quick)" not in solvers and solvers.count("asymmetric") == 1
    assert report.theoretical_speedup == pytest.approx(fastest_probe) and report.budget["met"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_searches_a_budget_and_its_answer_meets_it(model, data, method) -> None:
    """Each method's probes are planned and solved its own way (``--method nonlinear``'s were
    refused as a --symmetric asymmetric method's): the answer meets the budget, or none does."""
    try:
        result = compress_to_budget(model, Budget("error", 0.3), calibration=data, bench=False, rank_multiple=8,
                                    threads=1, method=method)
    except BudgetNotMetError:
        assert METHODS[method].data_free  # a baseline from the weights alone may miss it
        return
    assert held_out_error(model, result.model, data) <= 0.3 and result.report.method == method


def test_an_unmeetable_budget_says_so_with_the_best_figure(model, data) -> None:
    with pytest.raises(BudgetNotMetError, match="no decomposition meets relative output error <= 1e-09"):
        compress_to_budget(model, Budget("error", 1e-9), calibration=data, bench=False, rank_multiple=8, threads=1)


def test_a_user_metric(model, data, tmp_path) -> None:
    (tmp_path / "metric.py").write_text(
        "import numpy as np\n"
        "def cosine(original, candidate, labels):\n"
        "    a, b = next(iter(original.values())).ravel(), next(iter(candidate.values())).ravel()\n"
        "    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))\n")
    result = compress_to_budget(model, Budget.from_file(f"{tmp_path / 'metric.py'}:cosine", 0.999),
                                calibration=data, bench=False, rank_multiple=8, threads=1)
    assert result.report.budget["measured"] >= 0.999


@pytest.mark.parametrize("kind, limit", [("error", -1.0), ("agreement", 1.5), ("speed", 1.0), ("error", float("nan"))])
def test_bad_budgets(kind, limit) -> None:
    with pytest.raises(InvalidOptionError):
        Budget(kind, limit)


def test_the_command_line_search_with_report_and_plot(model, data, tmp_path) -> None:
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", data)
    args = [tmp_path / "m.onnx", tmp_path / "o.onnx", "--calib", tmp_path / "x.npy", "--no-bench", "--rank-multiple",
            "8", "--threads", "1"]
    result = invoke(*args, "--max-error", "0.05", "--report", tmp_path / "r.json", "--plot", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    assert "budget search: relative output error <= 0.05" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["budget"]["met"] and report["budget"]["measured"] <= 0.05 and report["frontier"]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad, message in ((["--max-error", "0.1", "--max-drop", "1"], "give one budget"),
                         (["--metric", "m.py:f"], "go together"), (["--plot", tmp_path / "p.png"], "give a budget"),
                         (["--max-drop", "1"], "needs labels"), (["--max-error", "0.1", "--dry-run"], "no dry run")):
        outcome = invoke(*args, *bad)
        assert outcome.exit_code == 2 and message in outcome.stderr, outcome.output


def test_an_infeasible_start_is_where_the_search_begins_not_an_error(model, data) -> None:
    result = compress_to_budget(model, Budget("error", 0.2), speedup=50.0, calibration=data, bench=False,
                                rank_multiple=8, threads=1)
    assert result.report.budget["met"] and any(p.solver == "infeasible" for p in result.report.frontier)


def test_the_method_is_solved_in_full_once_at_the_fastest_plan_its_quick_runs_met(model, data, monkeypatch) -> None:
    schedules = []
    solve = search.solve
    monkeypatch.setattr(search, "solve", lambda *args, **kw: schedules.append(kw["schedule"]) or solve(*args, **kw))
    report = compress_to_budget(model, Budget("error", 0.05), calibration=data, bench=False, rank_multiple=8,
                                threads=1).report
    assert schedules.count(PAPER_SCHEDULE) == 1 and schedules.count(PROBE_SCHEDULE) > 1
    full = [p for p in report.frontier if p.solver == "asymmetric"]
    quick = [p for p in report.frontier if p.solver == "asymmetric (quick)"]
    probes = [p for p in report.frontier if p.solver == "probe"]
    assert len(full) == 1 and full[0].met and quick and probes
    # where its quick runs predicted it meets the budget, else at the fastest of them that met
    assert full[0].theoretical_speedup >= max(p.theoretical_speedup for p in quick if p.met)
    assert len(quick) <= search.QUICK_RUNS + 1
    assert len({p.theoretical_speedup for p in probes}) == len(probes)  # no plan probed twice


def _analysed(model, data, method: str = "asym3d", speedup: float = 3.0):
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline.analysis import analyse
    from onnx_lowrank.pipeline.plan import plan_for

    opts = Options(method=method, speedup=speedup, bench=False, threads=1, rank_multiple=8, symmetric=True)
    analysis = analyse(model, opts, data, None, None, fixed_target=False)
    return analysis, plan_for(analysis, opts), opts


def test_a_3d_probe_runs_the_network_once_and_a_plan_at_known_or_lower_ranks_not_at_all(model, data,
                                                                                       monkeypatch) -> None:
    """A symmetric 3d solve (the budget search's probe of asym3d) takes every split layer's input
    from one run of the network, not one sub-graph run per layer; at ranks solved before, or
    lower ones (``methods.split_basis``), none."""
    from onnx_lowrank.methods import split_basis
    from onnx_lowrank.methods.chains import CLOSED_FORM
    from onnx_lowrank.pipeline.compress import solve
    from onnx_lowrank.pipeline.plan import plan_for

    analysis, plan, opts = _analysed(model, data)
    runs = []
    collect = split_basis.collect_responses
    monkeypatch.setattr(split_basis, "collect_responses", lambda *a, **kw: runs.append(1) or collect(*a, **kw))
    cache = {}
    first = solve(analysis, plan, opts, cache=cache, schedule=CLOSED_FORM)
    assert len(plan.spatial_ranks) >= 2 and len(runs) == 1
    assert all(len(first.chains[name]) == 3 for name in plan.spatial_ranks)  # k x 1, 1 x k, 1 x 1
    again = solve(analysis, plan, opts, cache=cache, schedule=CLOSED_FORM)
    assert len(runs) == 1 and again.chains == first.chains
    faster = plan_for(analysis, dataclasses.replace(opts, speedup=4.0))  # lower ranks: from the kept bases
    assert faster.spatial_ranks.keys() == plan.spatial_ranks.keys() and faster.spatial_ranks != plan.spatial_ranks
    assert all(faster.spatial_ranks[name] <= plan.spatial_ranks[name] for name in plan.spatial_ranks)
    solve(analysis, faster, opts, cache=cache, schedule=CLOSED_FORM)
    assert len(runs) == 1


def test_a_3d_probes_chains_from_the_bases_moments_are_those_solved_from_the_split_outputs(model, data) -> None:
    """Without a cache the split layers' outputs come from their own run and the closed form from
    the samples; a probe's, from the kept bases' moments: the same chains, and the same errors."""
    from onnx_lowrank.methods.chains import CLOSED_FORM
    from onnx_lowrank.pipeline.compress import solve
    from onnx_lowrank.pipeline.plan import plan_for

    cache = {}
    analysis, plan, opts = _analysed(model, data)
    solve(analysis, plan, opts, schedule=CLOSED_FORM, cache=cache)  # bases at these ranks
    for speedup in (3.0, 4.0):  # the bases' own ranks, then lower ones (nested in them)
        analysis_alone, plan, opts = _analysed(model, data, speedup=speedup)
        from_samples = solve(analysis_alone, plan, opts, schedule=CLOSED_FORM, cache=None)
        from_moments = solve(analysis, plan_for(analysis, opts), opts, schedule=CLOSED_FORM, cache=cache)
        assert plan.spatial_ranks
        for name, chain in from_samples.chains.items():
            for node, other in zip(chain, from_moments.chains[name]):
                scale = np.abs(node.weight).max()
                np.testing.assert_allclose(other.weight, node.weight, atol=2e-3 * scale)
            assert from_moments.errors[name] == pytest.approx(from_samples.errors[name], rel=1e-3, abs=1e-5)


def test_a_3d_search_runs_the_network_for_its_probes_splits_once(model, data, monkeypatch) -> None:
    """The first probe's network run keeps the bases of every plan the bracket can still probe
    (``methods.split_basis``): six and more probes, up and down from it, run none of their own."""
    from onnx_lowrank.methods import split_basis

    runs = []
    collect = split_basis.collect_responses
    monkeypatch.setattr(split_basis, "collect_responses", lambda *a, **kw: runs.append(1) or collect(*a, **kw))
    for limit in (0.1, 0.2):
        runs.clear()
        report = compress_to_budget(model, Budget("error", limit), calibration=data, bench=False, rank_multiple=8,
                                    threads=1, method="asym3d").report
        assert sum(p.solver == "probe" for p in report.frontier) >= 6 and len(runs) == 1


@pytest.mark.parametrize("sample_memory_mb", [2048, 1])
def test_split_bases_cover_the_bracket_within_the_sample_memory(model, data, monkeypatch, sample_memory_mb) -> None:
    """The bases' run keeps more than the probe's own splits (the bracket's other plans), unless
    that would take more than --sample-memory: then the probe's own only."""
    from onnx_lowrank.pipeline import probe_bases

    plans, kept = [], []
    plan_for, keep_bases = search.plan_for, probe_bases.keep_bases
    monkeypatch.setattr(search, "plan_for", lambda *a, **kw: plans.append(plan_for(*a, **kw)) or plans[-1])
    monkeypatch.setattr(probe_bases, "keep_bases", lambda *a: kept.append((dict(a[2]), plans[-1].spatial_ranks))
                        or keep_bases(*a))
    compress_to_budget(model, Budget("error", 0.1), calibration=data, bench=False, rank_multiple=8, threads=1,
                       method="asym3d", sample_memory_mb=sample_memory_mb)
    ranks, own = kept[0]
    assert all(ranks.get(name, 0) >= rank for name, rank in own.items())
    assert (ranks == own) == (sample_memory_mb == 1)


def test_the_bases_bytes_are_a_float_per_sample_rank_and_tap() -> None:
    from onnx_lowrank.methods.split_basis import basis_bytes
    from onnx_lowrank.planning.costs import ConvShape

    shapes = {"a": ConvShape(8, 16, (3, 5), (4, 4)), "b": ConvShape(8, 16, (3, 3), (2, 2))}
    assert basis_bytes({"a": 10, "b": 7}, {"a": 4, "b": 2}, shapes) == 4 * (10 * 4 * 5 + 7 * 2 * 3)


@pytest.mark.parametrize("from_basis", [False, True])
def test_the_split_layers_outputs_from_one_run_are_those_of_their_own_sub_graphs(data, from_basis, monkeypatch) -> None:
    """Independent reference: each split layer's output re-collected from the sub-graph up to it
    with only that layer split (the per-layer path), sample by sample; strided, dilated, wide and
    SAME-padded layers. ``from_basis``: a search's probe, whose outputs come from the bases a run
    at higher ranks kept (``methods.split_basis``), running no network."""
    from onnx_lowrank.graph.rewrite import replace_units
    from onnx_lowrank.graph.surgery import prefix_model
    from onnx_lowrank.methods import split_basis
    from onnx_lowrank.methods.chains import Solved, _split_outputs
    from onnx_lowrank.methods.split_basis import spatial_pair
    from onnx_lowrank.runtime.sessions import collect_responses

    model = conv_net([Layer(16), Layer(24, stride=2), Layer(24, dilation=2), Layer(24, k=(3, 5)),
                      Layer(16, auto_pad="SAME_UPPER", stride=2)], size=(10, 10), classifier=10, seed=5)
    analysis, _, _ = _analysed(model, data)
    units = [u for u in analysis.units if u.kind == "conv"][1:]  # the first has too few input channels
    assert len(units) == 4

    def split_outputs(rank: int, cache: dict | None) -> dict:
        pairs = {u.name: spatial_pair(u, rank) for u in units}
        outputs = _split_outputs(analysis.normalised, units, pairs, analysis.collect, analysis.shapes,
                                 Solved(timings={"collect_asymmetric": 0.0}), cache)
        # with a cache, the bases: a split's output is their product with its horizontal conv
        return {name: value if cache is None else value.output(pairs[name][1]) for name, value in outputs.items()}

    cache = {} if from_basis else None
    if from_basis:
        split_outputs(12, cache)
        monkeypatch.setattr(split_basis, "collect_responses", None)  # no network runs from here on
    together = split_outputs(5, cache)
    for unit in units:
        alone = collect_responses(replace_units(prefix_model(analysis.normalised, [unit.output]),
                                                {unit.name: spatial_pair(unit, 5)}), tensors=[unit.output],
                                  **analysis.collect)[unit.output]
        assert together[unit.name].shape == alone.shape and np.allclose(together[unit.name], alone, atol=1e-4)


def test_a_probe_lands_just_below_where_a_power_law_loss_meets_the_budget() -> None:
    """Planted: loss = 0.01 s^2 meets 0.09 at s = 3; probes at 2 (met) and 4 (missed)."""
    step = bracket.next_probe(2.0, 4.0, (0.04, 0.16, 0.09))
    assert 3 / (1 + bracket.PRECISION) < step < 3
    assert bracket.next_probe(step, 4.0, (0.01 * step ** 2, 0.16, 0.09)) is None  # within PRECISION of the answer
    assert bracket.next_probe(2.0, 4.0, None) == pytest.approx(8 ** 0.5)  # a user metric: bisection
    assert bracket.next_probe(2.0, 4.0, (0.0, 0.16, 0.09)) == pytest.approx(8 ** 0.5)  # a perfect copy says nothing
    assert bracket.next_probe(2.0, 2.05, (0.04, 0.16, 0.09)) is None and bracket.next_probe(2.0, None) == 4.0


def test_interpolated_probes_find_as_fast_a_plan_as_bisection_with_fewer_probes(model, data, monkeypatch) -> None:
    def searched():
        report = compress_to_budget(model, Budget("error", 0.05), calibration=data, bench=False, rank_multiple=8,
                                    threads=1).report
        return sum(p.solver == "probe" for p in report.frontier), report.theoretical_speedup

    probes, speedup = searched()
    interpolated = bracket.next_probe
    monkeypatch.setattr(search, "next_probe", lambda passing, failing, losses=None, **precision: interpolated(
        passing, failing, **precision))
    bisected_probes, bisected_speedup = searched()
    assert probes < bisected_probes and speedup >= bisected_speedup / (1 + bracket.PRECISION)


def _skip_net() -> onnx.ModelProto:
    """conv -> conv -> conv, the first's output added back after the third (a skip the cuts must
    carry), then a conv whose weight is a Constant node; the network's input read again at the
    very end (a cut's graph input)."""
    from onnx import TensorProto, helper

    from tests.builders import IR_VERSION, NetBuilder

    b = NetBuilder(seed=5)
    first = b.conv_layer("input", 3, Layer(16))
    x = b.conv_layer(b.conv_layer(first, 16, Layer(32)), 32, Layer(16))
    x = b.conv_layer(b.node("Add", [x, first]), 16, Layer(24))
    late_input = b.node("Add", [b.node("ReduceMean", [x], axes=[1, 2, 3]), "input"])  # reads the input last
    x = b.node("Add", [b.node("GlobalAveragePool", [x]), b.node("ReduceMean", [late_input], axes=[1, 2, 3])])
    weight = b.inits.pop(6)  # the last conv's, as a Constant node at the start (some exporters' way): not a cut's
    assert weight.name.startswith("w_") and weight.dims[0] == 24
    b.nodes.insert(0, helper.make_node("Constant", [], [weight.name], value=weight))
    graph = helper.make_graph(b.nodes, "skip-net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 24, 1, 1])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _sub_graph_output(analysis, unit, replaced: dict) -> np.ndarray:
    """The independent reference of a layer's Eq. 12 input: the sub-graph from the network's inputs
    up to the layer's output, with the ``replaced`` nodes in it replaced, run on the calibration data."""
    from onnx_lowrank.graph.rewrite import replace_units
    from onnx_lowrank.graph.surgery import prefix_model
    from onnx_lowrank.runtime.sessions import collect_responses

    prefix = prefix_model(analysis.normalised, [unit.output])
    inside = {node.name for node in prefix.graph.node}
    return collect_responses(replace_units(prefix, {n: c for n, c in replaced.items() if n in inside}),
                             tensors=[unit.output], **analysis.collect)[unit.output]


@pytest.mark.parametrize("kept", ["all", "none", "until one proves too large"])
def test_a_layers_input_from_the_kept_cut_is_that_of_its_sub_graph_from_the_inputs(data, kept) -> None:
    """Independent reference: the sub-graph from the network's inputs up to each layer, with the
    layers before it (and the layer itself) replaced, run on the calibration data."""
    from onnx_lowrank.graph.surgery import cut_before
    from onnx_lowrank.methods.carried import CarriedCut, CutSizes
    from onnx_lowrank.methods.split_basis import spatial_pair

    analysis, plan, _ = _analysed(_skip_net(), data)
    units = [u for u in analysis.units if u.decomposable]
    images = len(analysis.collect["indices"])
    # The last: sizes not measured, and a budget that holds the first cut but not the second,
    # which is found out while it is computed, after the first was let go.
    sizes = {"all": CutSizes(analysis.cuts.per_sample, 1 << 30), "none": CutSizes(analysis.cuts.per_sample, 0),
             "until one proves too large": CutSizes({}, analysis.cuts.per_sample[units[1].name] * images)}[kept]
    carried, replaced, layers = CarriedCut(analysis.normalised, analysis.collect, sizes), {}, []
    assert len(units) == 4
    for unit in units:
        replaced[unit.name] = spatial_pair(unit, 2)
        together, _ = carried.layer_output(unit, replaced, analysis.shapes)
        alone = _sub_graph_output(analysis, unit, replaced)
        assert together.shape == alone.shape and np.allclose(together, alone, atol=1e-5)
        layers.append(carried.layer)
        if carried.layer == unit.name:  # the analysis's estimate of the cut is what it holds (and the input)
            assert "input" in cut_before(analysis.normalised, unit.name)
            held = sum(value.nbytes for value in carried.batches[0].values()) + data[:len(carried.chunks[0])].nbytes
            assert analysis.cuts.per_sample[unit.name] * len(carried.chunks[0]) == held
    constants = {o for node in analysis.normalised.graph.node if node.op_type == "Constant" for o in node.output}
    assert constants and not any(constants & set(cut_before(analysis.normalised, name)) for name in analysis.cuts.per_sample)
    names = [unit.name for unit in units]
    assert layers == {"all": [None, *names[1:]], "none": [None] * 4,
                      "until one proves too large": [None, names[1], None, names[3]]}[kept]


def _sequence_net() -> tuple[onnx.ModelProto, np.ndarray]:
    """Four MatMul + Add + Relu layers over ``[batch, 20 positions, 32 channels]``, and data."""
    from tests.builders import NetBuilder, finish

    b, rng, x = NetBuilder(3), np.random.default_rng(0), "input"
    for k, n in ((32, 48), (48, 40), (40, 32), (32, 16)):
        weight = b.const("w", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        bias = b.const("b", rng.standard_normal(n).astype(np.float32))
        x = b.node("Relu", [b.node("Add", [b.node("MatMul", [x, weight]), bias])])
    return finish(b, x, ["N", 20, 32]), rng.standard_normal((60, 20, 32)).astype(np.float32)


@pytest.mark.parametrize("sequence", [None, _sequence_net()], ids=["convs then dense", "dense over positions"])
def test_a_dense_layers_input_in_the_approximated_network_is_its_sub_graphs_and_its_weights_stay_out_of_it(
        data, sequence, monkeypatch) -> None:
    """Independent reference as above: the sub-graph from the inputs up to each layer's output,
    the layers before it replaced (rank 2 of their weights, far from the original), run by
    onnxruntime; a dense layer's output, from its sampled input (at the positions its output is
    sampled at, where it has them) and its weights in NumPy. The first layer reads the network's
    input: that part runs as it is."""
    from onnx_lowrank.graph.rewrite import channel_chain
    from onnx_lowrank.methods import carried as carried_module
    from onnx_lowrank.solvers.weights import weight_svd

    parts = []
    collect = carried_module.collect_responses_and_values
    monkeypatch.setattr(carried_module, "collect_responses_and_values",
                        lambda part, **kw: parts.append({n.name for n in part.graph.node}) or collect(part, **kw))
    model, images = (conv_net([Layer(8), Layer(16)], size=(10, 10), dense=((24, "relu"), (16, "relu"), (12, "none")),
                              classifier=10, seed=5), data) if sequence is None else sequence
    analysis, _, _ = _analysed(model, images, method="asymmetric", speedup=1.2)
    units = [u for u in analysis.units if u.decomposable]
    assert [u.kind for u in units] == ["conv"] * 2 * (sequence is None) + ["dense"] * (3 if sequence is None else 4)
    carried, replaced = carried_module.CarriedCut(analysis.normalised, analysis.collect, analysis.cuts), {}
    for unit in units:
        together, _ = carried.layer_output(unit, replaced, analysis.shapes)
        alone = _sub_graph_output(analysis, unit, replaced)
        assert together.shape == alone.shape and np.allclose(together, alone, rtol=1e-4, atol=1e-5)
        assert (unit.name in parts[-1]) == (unit.kind == "conv" or unit.input == "input")
        factors = weight_svd(unit.weight, unit.bias, 2)
        replaced[unit.name] = channel_chain(unit, factors.P, factors.Q, factors.bias)


def test_above_two_quick_runs_that_met_the_next_is_where_their_power_law_reaches_the_budget() -> None:
    """Planted: the method's loss 0.01 s^2 / 4 (0.01 at 2x, 0.04 at 4x) reaches 0.09 at 6x."""
    from onnx_lowrank.output.report import FrontierPoint

    def searcher(limit: float):
        made = search._Searcher.__new__(search._Searcher)
        made.budget = Budget("error", limit)
        made.quick = {s: FrontierPoint(s, s, 0.0025 * s ** 2, True, "asymmetric (quick)") for s in (2.0, 4.0)}
        return made

    step = searcher(0.09)._method_step(searcher(0.09).quick[4.0])
    assert 6 / (1 + bracket.PRECISION) < step < 6
    assert searcher(1.0)._method_step(searcher(1.0).quick[4.0]) == pytest.approx(8 / (1 + bracket.PRECISION / 2))
    assert searcher(0.09)._method_step(searcher(0.09).quick[2.0]) is None  # no run below it
    assert searcher(0.0462)._method_step(searcher(0.0462).quick[4.0]) is None  # reached at 4.3x: under 10 % more


def test_a_cut_holding_a_sequence_is_never_carried_and_the_run_completes(data) -> None:
    """A value with no shape (a sequence) in the cut before a layer: measured as unknown, so the
    layer's input runs from the network's inputs, and the asymmetric run gives a working model."""
    from onnx import TensorProto, helper

    from onnx_lowrank import compress
    from tests.builders import IR_VERSION, NetBuilder

    b = NetBuilder(seed=6)
    first = b.conv_layer("input", 3, Layer(16))
    sequence = b.node("SequenceConstruct", [first])
    x = b.conv_layer(b.conv_layer(first, 16, Layer(16)), 16, Layer(16))
    x = b.node("Add", [x, b.node("SequenceAt", [sequence, b.const("zero", np.array(0, np.int64))])])
    b.inits[-1] = onnx.numpy_helper.from_array(np.array(0, np.int64), b.inits[-1].name)
    graph = helper.make_graph(b.nodes, "sequence-net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                      ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 16, 10, 10])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    analysis, _, _ = _analysed(model, data, method="asymmetric", speedup=1.3)
    assert sum(size == sys.maxsize for size in analysis.cuts.per_sample.values()) >= 1
    result = compress(model, 1.3, calibration=data, bench=False, rank_multiple=8, threads=1)
    assert result.report.fidelity.output_rel_error and held_out_error(model, result.model, data) < 0.5


def test_a_bases_run_takes_as_many_images_as_its_tap_outputs_fit() -> None:
    """Planted: 4 bytes x rank x taps x output positions per image and layer."""
    from onnx_lowrank.methods.split_basis import batch_for
    from onnx_lowrank.planning.costs import ConvShape

    shapes = {"a": ConvShape(8, 16, (3, 3), (10, 10)), "b": ConvShape(8, 16, (3, 5), (4, 4))}
    per_image = 4 * (6 * 3 * 100 + 2 * 5 * 16)  # 7,840 bytes
    assert batch_for({"a": 6, "b": 2}, shapes, 8, 3 * per_image) == 3
    assert batch_for({"a": 6, "b": 2}, shapes, 2, 3 * per_image) == 2  # never more than the run's own
    assert batch_for({"a": 6, "b": 2}, shapes, 8, per_image // 2) == 1  # at least one


def _planted_searcher(limit: float, probe_loss, method_loss):
    """A searcher whose probes and quick runs read planted loss curves of the speedup."""
    from onnx_lowrank.output.report import FrontierPoint

    made = search._Searcher.__new__(search._Searcher)
    made.budget, made.probes, made.infeasible, made.quick, made.predicted = Budget("error", limit), {}, set(), {}, None
    made.confirmed = None

    def quick_run(speedup: float) -> FrontierPoint:
        made.quick[speedup] = FrontierPoint(speedup, speedup, method_loss(speedup), method_loss(speedup) <= limit, "q")
        return made.quick[speedup]

    made._probe = lambda speedup: made.probes.setdefault(speedup, probe_loss(speedup))
    made._quick_run = quick_run
    return made


@pytest.mark.parametrize("method_loss, quick_runs, full_at", [
    (lambda s: 0.005 * s ** 2, 2, 18 ** 0.5),  # the method's gain over its probe is constant: the probes tell
    (lambda s: 0.02 * s, 3, 4.5),  # it falls with the speedup: the method's power law outruns the probes, a third decides
    (lambda s: 0.0025 * s ** 2.6, 2, 36 ** (1 / 2.6)),  # it rises: the second misses, the full run goes between
])
def test_the_methods_full_run_goes_where_two_or_three_quick_runs_say_it_meets_the_budget(method_loss, quick_runs,
                                                                                           full_at) -> None:
    """Planted: probes lose 0.01 s^2; the budget is 0.09 (probes meet it at 3x)."""
    made = _planted_searcher(0.09, lambda s: 0.01 * s ** 2, method_loss)
    passing, _ = made._probe_bracket(2.0)
    best = made._beyond(made._quick_run(passing))
    full = made.predicted or best.speedup_target
    assert len(made.quick) == quick_runs and method_loss(best.speedup_target) <= 0.09
    assert full_at / (1 + bracket.METHOD_PRECISION) < full <= full_at


def test_where_the_predicted_full_run_misses_the_next_is_at_the_fastest_quick_run_that_met() -> None:
    from onnx_lowrank.options import Options
    from onnx_lowrank.output.report import FrontierPoint

    made = _planted_searcher(0.09, lambda s: 0.01 * s ** 2, lambda s: 0.005 * s ** 2)
    made.iterative, made.cache, made.opts = True, {}, Options.from_keywords(method="asymmetric")
    evaluated = []

    def evaluate(speedup, opts, label):
        evaluated.append(speedup)
        loss = 0.0056 * speedup ** 2  # the full schedule a little worse than the quick one here
        return FrontierPoint(speedup, speedup, loss, loss <= 0.09, label), None, None, None

    made.evaluate = evaluate
    for speedup in (2.0, 3.0, 4.5):
        made._quick_run(speedup)
    made.predicted = 4.2
    answer = made._confirm(made.quick[3.0])
    assert evaluated == [4.2, 3.0] and answer[0].speedup_target == 3.0 and answer[0].met


@pytest.mark.parametrize("full_loss, evaluated", [
    (lambda s: 0.0056 * s ** 2, [2.95]),  # it meets there: the answer, and no quick run at all
    (lambda s: 0.011 * s ** 2, [2.95, 1.975]),  # it misses: a quick run halfway down, then the method there
])
def test_at_the_fastest_feasible_plan_the_method_runs_in_full_at_once(full_loss, evaluated) -> None:
    """VGG-16 on a loose budget: its probes meet up to the fastest feasible plan (every faster one
    infeasible, within the bracket's precision), where a quick run could only confirm it."""
    from onnx_lowrank.options import Options
    from onnx_lowrank.output.report import FrontierPoint

    made = _planted_searcher(0.09, lambda s: 0.01 * s ** 2, lambda s: 0.005 * s ** 2)
    made.iterative, made.cache, made.opts = True, {}, Options.from_keywords(method="asymmetric")
    made.probes, made.infeasible = {2.0: 0.04, 2.95: 0.087}, {3.05}
    runs = []

    def evaluate(speedup, opts, label):
        runs.append(speedup)
        return FrontierPoint(speedup, speedup, full_loss(speedup), full_loss(speedup) <= 0.09, label), None, None, None

    made.evaluate = evaluate
    answer = made._confirm(made._choose(2.95, 3.05))
    assert runs == evaluated and answer[0].met and answer[0].speedup_target == evaluated[-1]
    assert [s for s, p in made.quick.items() if p.met] == evaluated[1:]


@pytest.mark.parametrize("met, missed, predicted", [(0.0995, 0.1004, None), (0.08, 0.12, (1.13, 2.0))])
def test_between_a_quick_run_that_met_and_one_that_missed_the_full_run_goes_only_where_there_is_room(
        met, missed, predicted) -> None:
    """VGG-16 on its error floor met 0.1 at 1.13x by 0.0995 and missed it at 2x by 0.1004: any plan
    between would meet it by chance, the full run goes where the quick run met."""
    from onnx_lowrank.output.report import FrontierPoint

    made = _planted_searcher(0.1, lambda s: 0.0, lambda s: 0.0)
    made.quick = {1.13: FrontierPoint(1.13, 1.13, met, True, "q"), 2.0: FrontierPoint(2.0, 2.0, missed, False, "q")}
    assert made._beyond(made.quick[1.13]) is made.quick[1.13]
    if predicted is None:
        assert made.predicted is None
    else:  # the power law through them reaches 0.1 / (1 + QUICK_GAP) at 1.50x: a little below
        assert predicted[0] < made.predicted < 1.50
