"""Rank selection from measured sensitivity: the greedy allocation against a brute-force optimum,
the loss curve, the ladder, and the pipeline picking a planted rank."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.planning.costs import ConvShape
from onnx_lowrank.planning.measured import _loss_curve, measured_ranks
from onnx_lowrank.planning.ranks import RankCandidate, rank_ladder  # noqa: F401

SHAPE = ConvShape(64, 64, (3, 3), (8, 8))


def convex_losses(scale: float, full: int = 64) -> dict[int, float]:
    return {r: scale * (1 - r / full) ** 2 for r in range(8, full, 8)}


def test_greedy_allocation_matches_brute_force_on_convex_losses() -> None:
    candidates = [RankCandidate(f"l{i}", SHAPE) for i in range(4)]
    scales = [0.0, 1.0, 4.0, 0.25]  # l0 is left whole as the first layer
    losses = {c.name: convex_losses(s) for c, s in zip(candidates, scales)}
    plan = measured_ranks(candidates, losses, 0, 1.6, multiple=8)
    assert plan.speedup >= 1.6
    curves = {n: _loss_curve(losses[n], 64) for n in losses}

    def cost(name, rank):
        candidate = next(c for c in candidates if c.name == name)
        return candidate.shape.macs if rank >= candidate.break_even else candidate.macs_at(rank)

    target = plan.macs_before / 1.6
    best = min((sum(curves[n][r] for n, r in zip(("l1", "l2", "l3"), combo)), combo)
               for combo in itertools.product(range(8, 65, 8), repeat=3)
               if SHAPE.macs + sum(cost(n, r) for n, r in zip(("l1", "l2", "l3"), combo)) <= target)
    greedy = sum(curves[n][plan.ranks.get(n, 64)] for n in ("l1", "l2", "l3"))
    assert greedy <= best[0] * 1.05 + 1e-12
    assert plan.ranks["l3"] < plan.ranks["l1"] < plan.ranks.get("l2", 64)  # cut where it hurts least


def test_hopeless_layers_stay_whole() -> None:
    candidates = [RankCandidate(f"l{i}", SHAPE) for i in range(3)]
    losses = {"l1": {r: 0.9 for r in range(8, 64, 8)}, "l2": convex_losses(0.5)}
    plan = measured_ranks(candidates, losses, 0, 1.3, multiple=8)
    assert "l1" not in plan.ranks and "more than 0.5" in plan.skipped["l1"] and plan.speedup >= 1.3


def test_loss_curve_interpolates_and_never_falls_with_the_rank() -> None:
    curve = _loss_curve({16: 0.4, 32: 0.5, 48: 0.1}, 64)  # a noisy measurement at 32
    assert curve[64] == 0 and curve[56] == pytest.approx(0.05) and curve[48] == pytest.approx(0.1)
    assert np.all(np.diff(curve) <= 0) and curve[16] >= 0.5 and curve[0] == curve[16]


def test_the_ladder_is_on_the_grid_and_below_what_pays() -> None:
    candidate = RankCandidate("c", ConvShape(256, 256, (3, 3), (14, 14)))
    ladder = rank_ladder(candidate, 16)
    assert ladder == sorted(set(ladder), reverse=True) and all(r % 16 == 0 for r in ladder)
    assert max(ladder) < min(candidate.full_rank, candidate.break_even) and len(ladder) >= 5


def test_the_pipeline_finds_a_planted_rank(tmp_path) -> None:
    from onnx_lowrank import compress
    from tests.test_api import planted_model, speedup_for_rank

    data = np.random.default_rng(0).standard_normal((60, 3, 12, 12)).astype(np.float32)
    report = compress(planted_model(), speedup_for_rank(16), calibration=data, bench=False,
                      rank_selection="sensitivity").report
    assert report.layers[1].rank == 16 and report.layers[1].response_error < 1e-3
    assert report.timings_s["sensitivity"] > 0
    assert not any("3d chain" in w for w in report.warnings)


def test_sensitivity_with_asym3d_warns_that_it_measures_channel_decompositions() -> None:
    from onnx_lowrank import compress
    from tests.builders import Layer, conv_net

    data = np.random.default_rng(0).standard_normal((60, 3, 12, 12)).astype(np.float32)
    report = compress(conv_net([Layer(16), Layer(32), Layer(32)]), 2.0, calibration=data, bench=False, threads=1,
                      method="asym3d", rank_selection="sensitivity").report
    assert any("not the 3d chain" in w for w in report.warnings)


def test_sensitivity_needs_a_data_driven_method() -> None:
    from onnx_lowrank.options import Options

    with pytest.raises(InvalidOptionError, match="data-driven methods"):
        Options(method="svd", rank_selection="sensitivity")


def test_running_only_the_suffix_after_each_layer_measures_what_the_whole_model_does(monkeypatch) -> None:
    """The cheap path (cut values computed once, the suffix run per rank) against the whole model
    run per rank."""
    import dataclasses

    from onnx_lowrank.measure import sensitivity
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline import compress as api
    from tests.builders import Layer, conv_net

    model = conv_net([Layer(16), Layer(32, weight_rank=8), Layer(32), Layer(32, weight_rank=4)], size=(10, 10),
                     classifier=5)
    data = np.random.default_rng(0).standard_normal((48, 3, 10, 10)).astype(np.float32)
    opts = Options(speedup=1.5, bench=False)
    analysis = api.analyse(model, dataclasses.replace(opts), data)
    cheap = sensitivity.measure_sensitivity(analysis, opts)
    monkeypatch.setattr(sensitivity, "CUT_MEMORY", -1)
    whole = sensitivity.measure_sensitivity(analysis, opts)
    assert cheap.keys() == whole.keys() and len(cheap) == 3
    for layer in cheap:
        assert cheap[layer].keys() == whole[layer].keys()
        assert np.allclose(list(cheap[layer].values()), list(whole[layer].values()), rtol=1e-4, atol=1e-6)


def test_each_loss_is_the_models_error_with_that_layers_pca_chain_alone() -> None:
    """Independent reference: the top eigenvectors V of the layer's response covariance (Eq. 4),
    the response rebuilt as V V^T (y - mean) + mean, the layer alone replaced by that chain in
    the model, run on the same calibration samples and compared with the original's output."""
    import dataclasses

    from onnx_lowrank.graph.rewrite import channel_chain, replace_units
    from onnx_lowrank.measure import sensitivity
    from onnx_lowrank.measure.fidelity import model_outputs
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline import compress as api
    from tests.builders import Layer, conv_net

    model = conv_net([Layer(16), Layer(32), Layer(32), Layer(32)], size=(10, 10), classifier=5, seed=2)
    data = np.random.default_rng(1).standard_normal((48, 3, 10, 10)).astype(np.float32)
    opts = Options(speedup=1.5, bench=False, rank_multiple=8)
    analysis = api.analyse(model, dataclasses.replace(opts), data)
    losses = sensitivity.measure_sensitivity(analysis, opts)
    split = analysis.data
    subset = split.calib_indices[::max(1, len(split.calib_indices) // sensitivity.SUBSET)][:sensitivity.SUBSET]
    reference = model_outputs(analysis.normalised, split.source, subset, split.batch)
    checked = 0
    for name, by_rank in losses.items():
        unit = analysis.by_name[name]
        y = analysis.responses[unit.output].astype(np.float64)
        mean = y.mean(axis=0)
        _, vectors = np.linalg.eigh(np.cov(y, rowvar=False))
        for rank, loss in by_rank.items():
            v = vectors[:, ::-1][:, :rank]
            chain = channel_chain(unit, v, v, mean - v @ (v.T @ mean))
            outputs = model_outputs(replace_units(analysis.normalised, {name: chain}), split.source, subset,
                                    split.batch, produced=True)
            name_out = next(iter(reference))
            error = np.linalg.norm(outputs[name_out] - reference[name_out]) / np.linalg.norm(reference[name_out])
            assert loss == pytest.approx(error, rel=1e-3, abs=1e-6)
            checked += 1
    assert checked >= 6


def test_a_layers_ranks_share_one_session_and_measure_what_a_session_per_rank_does(monkeypatch) -> None:
    """Each layer's chains fed at every rank to one session of its top rank's, zero-padded, against
    a rewrite and a session per rank (the path for chains that cannot be padded): the same losses,
    with one measuring session per layer."""
    import dataclasses

    from onnx_lowrank.measure import sensitivity
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline import compress as api
    from onnx_lowrank.runtime.sessions import make_session
    from tests.builders import Layer, conv_net

    model = conv_net([Layer(16), Layer(32), Layer(32)], size=(10, 10), dense=((48, "relu"),), classifier=5, seed=4)
    data = np.random.default_rng(2).standard_normal((48, 3, 10, 10)).astype(np.float32)
    opts = Options(speedup=1.5, bench=False, rank_multiple=8)
    analysis = api.analyse(model, dataclasses.replace(opts), data)
    sessions = []
    monkeypatch.setattr(sensitivity, "make_session",
                        lambda model, **kw: sessions.append(model) or make_session(model, **kw))
    shared = sensitivity.measure_sensitivity(analysis, opts)
    measuring = [m for m in sessions if any(i.name.endswith(".weight") for i in m.graph.input)]
    assert len(measuring) == len(shared) >= 3
    assert sum(map(len, shared.values())) > len(shared)
    monkeypatch.setattr(sensitivity, "differ_in_rank_alone", lambda chain, top: False)  # as a grouped layer's
    apart = sensitivity.measure_sensitivity(analysis, opts)
    for layer in shared:
        assert np.allclose(list(shared[layer].values()), list(apart[layer].values()), rtol=1e-4, atol=1e-6)


def test_a_layer_that_reads_the_networks_input_alone_is_measured_from_it() -> None:
    """A dense layer first in the graph: the cut before it is the network's input, computed by
    nothing. Independent reference: the model with that layer's PCA chain (the top eigenvectors
    of its responses' covariance) in place, run whole by onnxruntime."""
    import dataclasses

    from onnx import TensorProto, helper, numpy_helper

    from onnx_lowrank.graph.rewrite import channel_chain, replace_units
    from onnx_lowrank.measure import sensitivity
    from onnx_lowrank.measure.fidelity import model_outputs
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline import compress as api

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("w1", (16, 64)), ("b1", (64,)), ("w2", (64, 64)), ("b2", (64,)), ("w3", (64, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["a2"]), helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = Options(speedup=1.3, bench=False, rank_multiple=4)
    analysis = api.analyse(model, dataclasses.replace(opts), rng.standard_normal((400, 16)).astype(np.float32))
    losses = sensitivity.measure_sensitivity(analysis, opts)["fc1"]
    split = analysis.data
    subset = split.calib_indices[::max(1, len(split.calib_indices) // sensitivity.SUBSET)][:sensitivity.SUBSET]
    reference = model_outputs(analysis.normalised, split.source, subset, split.batch)["y"]
    unit = analysis.by_name["fc1"]
    y = analysis.responses[unit.output].astype(np.float64)
    vectors = np.linalg.eigh(np.cov(y, rowvar=False))[1][:, ::-1]
    assert len(losses) >= 2
    for rank, loss in losses.items():
        v = vectors[:, :rank]
        chain = channel_chain(unit, v, v, y.mean(axis=0) - v @ (v.T @ y.mean(axis=0)))
        outputs = model_outputs(replace_units(analysis.normalised, {"fc1": chain}), split.source, subset, split.batch,
                                produced=True)["y"]
        assert loss == pytest.approx(np.linalg.norm(outputs - reference) / np.linalg.norm(reference), rel=1e-3, abs=1e-6)
