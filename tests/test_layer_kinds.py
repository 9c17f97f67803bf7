"""Layers beyond the 2-D conv: 1-D and 3-D convs, ConvTranspose, Gemm and MatMul (issue 13).

Full-rank rewrites (random orthogonal Q, P = Q) must reproduce the original for random shapes and
attributes; the pipeline must collect a dense layer's responses along its last axis (a planted
low-rank MatMul is recovered exactly); GELU written out is recognised by what it computes."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank import compress
from onnx_lowrank.errors import InfeasibleTargetError, NothingToDecomposeError
from onnx_lowrank.graph.normalise import normalise
from onnx_lowrank.graph.units import find_units
from onnx_lowrank.planning.costs import ConvShape, decomposed_macs
from tests.builders import NetBuilder, finish, gelu_written_out, relative_error, run_model
from tests.test_rewrite import full_rank_rewrite, op_count

SEEDS = range(6)


def conv_nd(seed: int, dims: int, groups: int = 1):
    """A random 1-, 2- or 3-D conv with strides, pads, dilations (or auto_pad), a BatchNorm and a ReLU."""
    rng = np.random.default_rng(seed)
    b = NetBuilder(seed)
    c, d = groups * int(rng.integers(2, 6)), groups * int(rng.integers(2, 9))
    size = [int(rng.integers(7, 12)) for _ in range(dims)]
    k = [int(rng.integers(1, 4)) for _ in range(dims)]
    attrs = {"kernel_shape": k, "strides": [int(rng.integers(1, 3)) for _ in range(dims)],
             "dilations": [int(rng.integers(1, 3)) for _ in range(dims)]}
    if seed % 3 == 0:
        attrs["auto_pad"] = "SAME_UPPER"
        attrs["dilations"] = [1] * dims
    else:
        attrs["pads"] = [int(rng.integers(0, 3)) for _ in range(2 * dims)]
    if groups > 1:
        attrs["group"] = groups
    y = b.node("Conv", ["input", b.const("w", rng.standard_normal((d, c // groups, *k))),
                        b.const("b", rng.standard_normal(d))], **attrs)
    y = b.node("BatchNormalization", [y, b.const("g", rng.uniform(0.5, 1.5, d)), b.const("be", rng.standard_normal(d)),
                                      b.const("m", rng.standard_normal(d)), b.const("v", rng.uniform(0.5, 2, d))])
    return finish(b, b.node("Relu", [y]), ["N", c, *size]), [c, *size]


def conv_transpose(seed: int, dims: int):
    rng = np.random.default_rng(seed)
    b = NetBuilder(seed)
    c, d = int(rng.integers(2, 9)), int(rng.integers(4, 17))
    size = [int(rng.integers(4, 8)) for _ in range(dims)]
    k = [int(rng.integers(2, 5)) for _ in range(dims)]
    strides = [int(rng.integers(1, 3)) for _ in range(dims)]
    attrs = {"kernel_shape": k, "strides": strides}
    if seed % 2:
        attrs["output_shape"] = [n * s + int(rng.integers(0, s)) for n, s in zip(size, strides)]
    else:
        attrs["pads"] = [int(rng.integers(0, 2)) for _ in range(2 * dims)]
        attrs["output_padding"] = [int(rng.integers(0, s)) for s in strides]
    inputs = ["input", b.const("w", rng.standard_normal((c, d, *k)))]
    if seed % 3:
        inputs.append(b.const("b", rng.standard_normal(d)))
    return finish(b, b.node("ConvTranspose", inputs, **attrs), ["N", c, *size]), [c, *size]


def gemm(seed: int):
    rng = np.random.default_rng(seed)
    b = NetBuilder(seed)
    k, n = int(rng.integers(3, 20)), int(rng.integers(3, 20))
    trans_b = seed % 2
    weight = rng.standard_normal((n, k) if trans_b else (k, n))
    bias = [rng.standard_normal(n), rng.standard_normal((1, n)), np.array(0.7)][seed % 3]
    y = b.node("Gemm", ["input", b.const("w", weight), b.const("c", bias)], transB=trans_b,
               alpha=float(rng.uniform(0.5, 2)), beta=float(rng.uniform(0.5, 2)))
    return finish(b, b.node("Tanh", [y]), ["N", k]), [k]  # not a head: one feeding a Softmax or the output is


def matmul(seed: int):
    """x W (+ b, the bias on either side of the Add) on a [B, K], [B, T, K] or NHWC [B, H, W, K] input."""
    rng = np.random.default_rng(seed)
    b = NetBuilder(seed)
    k, n = int(rng.integers(3, 20)), int(rng.integers(3, 20))
    lead = [[], [5], [3, 4]][seed % 3]
    y = b.node("MatMul", ["input", b.const("w", rng.standard_normal((k, n)))])
    if seed % 2:
        bias = b.const("b", rng.standard_normal(n))
        y = b.node("Add", [y, bias] if seed % 4 == 1 else [bias, y])
    return finish(b, b.node("Relu", [y]), ["N", *lead, k]), [*lead, k]


CASES = ([("conv1d", s, lambda s=s: conv_nd(s, 1)) for s in SEEDS] + [("conv3d", s, lambda s=s: conv_nd(s, 3)) for s in SEEDS]
         + [("transpose1d", s, lambda s=s: conv_transpose(s, 1)) for s in SEEDS]
         + [("transpose2d", s, lambda s=s: conv_transpose(s, 2)) for s in SEEDS]
         + [("grouped1d", s, lambda s=s: conv_nd(s, 1, groups=2 + s % 3)) for s in SEEDS]
         + [("grouped2d", s, lambda s=s: conv_nd(s, 2, groups=2 + s % 3)) for s in SEEDS]
         + [("gemm", s, lambda s=s: gemm(s)) for s in SEEDS] + [("matmul", s, lambda s=s: matmul(s)) for s in SEEDS])


@pytest.mark.parametrize("kind, seed, build", CASES, ids=[f"{kind}-{seed}" for kind, seed, _ in CASES])
@pytest.mark.parametrize("batch", [1, 2])
def test_full_rank_rewrite_reproduces_every_layer_kind(kind, seed, build, batch) -> None:
    model, shape = build()
    rewritten, units = full_rank_rewrite(model, seed)
    assert len(units) == 1
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    (expected,), (actual,) = run_model(model, {"input": x}), run_model(rewritten, {"input": x})
    assert actual.shape == expected.shape
    assert relative_error(expected, actual) < 1e-4
    assert op_count(rewritten, "BatchNormalization") == 0


def test_the_units_of_each_kind() -> None:
    (conv1,) = find_units(normalise(conv_nd(1, 1)[0]))
    assert (conv1.kind, conv1.kernel, conv1.activation.kind, conv1.channel_axis) == ("conv", conv1.weight.shape[2:],
                                                                                      "relu", 1)
    (transposed,) = find_units(normalise(conv_transpose(2, 2)[0]))
    assert transposed.kind == "transpose" and transposed.weight.shape[:2] == transposed.weight_shape[:2]
    (dense,) = find_units(normalise(matmul(1)[0]))
    assert (dense.kind, dense.channel_axis, dense.activation.kind) == ("dense", -1, "relu")
    assert dense.bias_after is not None and np.array_equal(dense.bias, dense.bias_after)


def _pair_model(b: NetBuilder, left: str, right: str, k: int):
    return finish(b, b.node("MatMul", [left, right]), ["N", 4, k])


def test_products_without_a_usable_constant_are_listed_with_a_reason() -> None:
    b = NetBuilder()
    transposed = b.node("Transpose", ["input"], perm=[0, 2, 1])
    attention = find_units(normalise(_pair_model(b, "input", transposed, 4)))
    assert [u.skipped_reason for u in attention] == ["no constant operand: a product of two computed tensors "
                                                    "(attention, say)"]
    b = NetBuilder()
    left = find_units(normalise(_pair_model(b, b.const("w", np.ones((3, 4))), "input", 5)))
    assert "left operand" in left[0].skipped_reason
    b = NetBuilder()
    batched = find_units(normalise(_pair_model(b, "input", b.const("w", np.ones((2, 5, 3))), 5)))
    assert "3 dimensions" in batched[0].skipped_reason


@pytest.mark.parametrize("form, tanh", [("erf", 0.0), ("tanh", 1.0)])
def test_gelu_written_out_is_recognised(form, tanh) -> None:
    b = NetBuilder()
    y = b.node("MatMul", ["input", b.const("w", np.ones((6, 5)))])
    model = finish(b, gelu_written_out(b, y, form), ["N", 3, 6])
    (unit,) = find_units(normalise(model))
    assert unit.activation.kind == "gelu" and unit.activation.params == {"tanh_approximation": tanh}


def test_a_near_gelu_is_not_taken_for_one() -> None:
    b = NetBuilder()
    y = b.node("MatMul", ["input", b.const("w", np.ones((6, 5)))])
    inner = b.node("Erf", [b.node("Div", [y, b.const("s", np.array(1.3))])])
    out = b.node("Mul", [b.node("Mul", [y, b.node("Add", [inner, b.const("one", np.array(1.0))])]),
                         b.const("half", np.array(0.5))])
    (unit,) = find_units(normalise(finish(b, out, ["N", 6])))
    assert unit.activation.kind == "none"


def test_an_intermediate_read_elsewhere_is_not_an_activation() -> None:
    b = NetBuilder()
    y = b.node("MatMul", ["input", b.const("w", np.ones((6, 5)))])
    gelu = gelu_written_out(b, y, "erf")
    erf = next(n.output[0] for n in b.nodes if n.op_type == "Erf")
    (unit,) = find_units(normalise(finish(b, b.node("Add", [gelu, erf]), ["N", 6])))
    assert unit.activation.kind == "none"


def mlp(seed: int = 0, tokens: int = 12, width: int = 32, hidden: int = 96, rank: int | None = None):
    """A transformer-style MLP block on [B, T, C]: MatMul + bias, GELU (erf, written out), MatMul +
    bias, added to its input."""
    rng = np.random.default_rng(seed)
    b = NetBuilder(seed)
    up = rng.standard_normal((width, hidden)) / np.sqrt(width)
    if rank:
        up = rng.standard_normal((width, rank)) @ rng.standard_normal((rank, hidden)) / np.sqrt(width * rank)
    y = b.node("Add", [b.node("MatMul", ["input", b.const("up", up)]), b.const("b1", rng.standard_normal(hidden) * 0.1)])
    y = gelu_written_out(b, y, "erf")
    y = b.node("Add", [b.node("MatMul", [y, b.const("down", rng.standard_normal((hidden, width)) / np.sqrt(hidden))]),
                       b.const("b2", rng.standard_normal(width) * 0.1)])
    return finish(b, b.node("Add", ["input", y]), ["N", tokens, width])  # the residual stream


def test_a_planted_low_rank_dense_layer_is_recovered_from_its_responses() -> None:
    """The up-projection's response has rank 8 over its 96 outputs: PCA of responses sampled along
    the last axis finds it exactly (sampled along any other axis the chain could not be right)."""
    model = mlp(rank=8)
    down = [u.name for u in find_units(model) if u.kind == "dense"][-1]
    data = np.random.default_rng(1).standard_normal((120, 12, 32)).astype(np.float32)
    result = compress(model, 1.3, calibration=data, method="linear", rank_multiple=8, skip=down, bench=False,
                      num_images=100, holdout=20)
    (up,) = [layer for layer in result.report.layers if layer.rank is not None]
    assert up.op == "MatMul" and up.rank <= 16 and up.activation == "gelu"
    x = data[-4:]
    (expected,), (actual,) = run_model(model, {"input": x}), run_model(result.model, {"input": x})
    assert relative_error(expected, actual) < 1e-4


@pytest.mark.slow
def test_dense_layers_are_planned_with_the_convs_unless_ops_leaves_them_out() -> None:
    model = mlp()
    data = np.random.default_rng(1).standard_normal((60, 12, 32)).astype(np.float32)
    result = compress(model, 2.0, calibration=data, method="nonlinear", rank_multiple=8, bench=False, num_images=48,
                      holdout=12)
    report = result.report
    decomposed = [layer for layer in report.layers if layer.rank is not None]
    assert {layer.op for layer in decomposed} == {"MatMul"}
    assert report.theoretical_speedup >= 2.0 and report.theoretical_speedup_by_kind["dense"] >= 2.0
    held_out = data[-12:]  # an array's held-out part is the block at its end
    (expected,), (actual,) = run_model(model, {"input": held_out}), run_model(result.model, {"input": held_out})
    (measured,) = report.fidelity.output_rel_error.values()
    assert measured == pytest.approx(relative_error(expected, actual), rel=1e-3)
    with pytest.raises(Exception, match="no decomposable layer"):
        compress(model, 2.0, calibration=data, ops="conv", bench=False, dry_run=True)


def grouped_planted(groups: int = 4, per_group_rank: int = 2):
    """A grouped 3 x 3 conv whose every group's weight matrix has rank ``per_group_rank``."""
    rng = np.random.default_rng(0)
    b = NetBuilder()
    c, d = 8 * groups, 16 * groups
    blocks = [rng.standard_normal((16, per_group_rank)) @ rng.standard_normal((per_group_rank, 8 * 9))
              for _ in range(groups)]
    weight = np.concatenate(blocks).reshape(d, 8, 3, 3) / 10
    y = b.node("Conv", ["input", b.const("w", weight), b.const("b", rng.standard_normal(d))], group=groups,
               pads=[1] * 4, kernel_shape=[3, 3])
    return finish(b, y, ["N", c, 9, 9]), c


def test_a_grouped_conv_is_decomposed_per_group() -> None:
    """Each group's response has rank 2, so per-group PCA at 2 per group (total rank 8, on the
    grid of 4 groups x the multiple) reproduces it exactly; one fit over all 64 channels at rank 8
    could too, but its chain would read every input channel."""
    model, c = grouped_planted()
    data = np.random.default_rng(1).standard_normal((60, c, 9, 9)).astype(np.float32)
    result = compress(model, 3.0, calibration=data, method="linear", rank_multiple=2, bench=False, num_images=48,
                      holdout=12)
    (layer,) = result.report.layers
    assert layer.rank % 4 == 0 and layer.rank >= 8 and layer.energy == pytest.approx(1.0)
    assert any("grouped conv(s) decomposed per group" in warning for warning in result.report.warnings)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert [next(a.i for a in n.attribute if a.name == "group") for n in convs] == [4, 4]
    (expected,), (actual,) = run_model(model, {"input": data[-4:]}), run_model(result.model, {"input": data[-4:]})
    assert relative_error(expected, actual) < 1e-4


def test_costs_of_the_new_kinds() -> None:
    """Counted by hand: a dense layer on T rows, a ConvTranspose per input position, a grouped
    conv's per-group chain."""
    dense = ConvShape(48, 64, (1, 1), (12, 1))
    assert dense.macs == 12 * 48 * 64 and decomposed_macs(dense, 8) == 12 * 8 * (48 + 64)
    transposed = ConvShape(8, 16, (3, 3), (14, 14), in_hw=(7, 7), transposed=True)
    assert transposed.macs == 49 * 16 * 8 * 9
    assert decomposed_macs(transposed, 4) == 49 * 4 * 8 * 9 + 196 * 4 * 16
    grouped = ConvShape(32, 64, (3, 3), (10, 10), group=4)
    assert grouped.macs == 100 * 64 * 8 * 9
    # total rank 8 = 2 per group: (3 x 3, 8 -> 2) and (1 x 1, 2 -> 16) in each of the 4 groups
    assert decomposed_macs(grouped, 8) == 4 * 100 * (2 * 8 * 9 + 16 * 2)


@pytest.mark.parametrize("op, dims", [("Conv", 1), ("Conv", 3), ("ConvTranspose", 2)])
def test_planted_low_rank_convs_of_every_kind_are_recovered(op, dims) -> None:
    """Output channels = A (rank 4) times anything: PCA of the sampled responses at rank >= 4 is
    exact, whatever the kind's layout, strides and output size."""
    rng = np.random.default_rng(3)
    b = NetBuilder(3)
    c, d, k = 6, 32, [3] * dims
    canonical = (rng.standard_normal((d, 4)) @ rng.standard_normal((4, c * 3 ** dims))).reshape(d, c, *k) / 10
    weight = canonical if op == "Conv" else np.swapaxes(canonical, 0, 1)
    attrs = {"kernel_shape": k, "strides": [2] * dims, "pads": [1] * (2 * dims)}
    if op == "ConvTranspose":
        attrs["output_padding"] = [1] * dims
    y = b.node(op, ["input", b.const("w", weight), b.const("b", rng.standard_normal(d))], **attrs)
    size = [9] * dims if dims < 3 else [6] * dims
    model = finish(b, y, ["N", c, *size])
    data = rng.standard_normal((60, c, *size)).astype(np.float32)
    result = compress(model, 1.5, calibration=data, method="linear", rank_multiple=4, bench=False, num_images=48,
                      holdout=12)
    (layer,) = result.report.layers
    assert layer.op == op and 4 <= layer.rank < d and layer.energy == pytest.approx(1.0)
    (expected,), (actual,) = run_model(model, {"input": data[-4:]}), run_model(result.model, {"input": data[-4:]})
    assert relative_error(expected, actual) < 1e-4


def test_hard_swish_and_silu_written_out_are_recognised() -> None:
    """PaddlePaddle's export: x * clip(x + 3, 0, 6) / 6 after a conv, x * sigmoid(x) after a MatMul's bias."""
    b = NetBuilder()
    y = b.node("Conv", ["input", b.const("w", np.ones((4, 3, 1, 1)))], kernel_shape=[1, 1])
    clipped = b.node("Clip", [b.node("Add", [y, b.const("three", np.array(3.0))]), b.const("lo", np.array(0.0)),
                              b.const("hi", np.array(6.0))])
    out = b.node("Mul", [b.const("scale", np.array(1.5)),
                         b.node("Div", [b.node("Mul", [y, clipped]), b.const("six", np.array(6.0))])])
    (conv,) = find_units(normalise(finish(b, out, ["N", 3, 5, 5])))
    assert conv.activation.kind == "hard_swish"
    b = NetBuilder()
    y = b.node("Add", [b.node("MatMul", ["input", b.const("w", np.ones((6, 5)))]), b.const("b", np.ones(5))])
    swish = b.node("Mul", [y, b.node("Sigmoid", [b.node("Mul", [y, b.const("beta", np.array(1.0))])])])
    (dense,) = find_units(normalise(finish(b, swish, ["N", 3, 6])))
    assert dense.activation.kind == "silu"


@pytest.mark.parametrize("groups, expected_step", [(1, 16), (2, 16), (3, 18), (14, 28), (32, 32)])
def test_a_grouped_conv_ranks_on_a_grid_of_its_groups(groups, expected_step) -> None:
    """Every rank energy selection gives a grouped conv splits evenly among its groups, and the
    plan's cost is the per-group chain's (counted by hand in test_costs_of_the_new_kinds)."""
    from onnx_lowrank.planning.ranks import RankCandidate, energy_ranks

    channels = 8 * expected_step
    grouped = RankCandidate("grouped", ConvShape(channels, channels, (3, 3), (14, 14), group=groups))
    plain = RankCandidate("plain", ConvShape(64, 64, (3, 3), (14, 14)))
    assert grouped.step(16) == expected_step
    spectra = {c.name: np.linspace(2.0, 0.1, c.full_rank) for c in (grouped, plain)}
    plan = energy_ranks([plain, grouped], spectra, 0, 2.0, 16, leave_first=False)
    assert plan.ranks["grouped"] % groups == 0 and plan.ranks["grouped"] % expected_step == 0
    assert plan.macs_after == grouped.macs_at(plan.ranks["grouped"]) + plain.macs_at(plan.ranks["plain"])
    assert plan.speedup >= 2.0


@pytest.mark.slow
def test_asym3d_and_sensitivity_plan_dense_layers_too() -> None:
    """Nothing to split spatially: asym3d's channel part must make the whole target itself (it
    once returned a plan short of it); sensitivity measures the first dense layer (the paper's
    first-layer rule is about convs)."""
    model = mlp()
    data = np.random.default_rng(1).standard_normal((80, 12, 32)).astype(np.float32)
    options = dict(calibration=data, rank_multiple=8, bench=False, num_images=60, holdout=20)
    three_d = compress(model, 2.0, method="asym3d", **options).report
    assert three_d.theoretical_speedup >= 2.0 and all(layer.spatial_rank is None for layer in three_d.layers)
    sensitive = compress(model, 1.5, rank_selection="sensitivity", **options).report
    assert "no sensitivity measured" not in {layer.skipped_reason for layer in sensitive.layers}
    assert sensitive.theoretical_speedup >= 1.5


@pytest.mark.parametrize("seed", SEEDS)
def test_a_3d_conv_split_into_spatial_and_temporal_parts_reproduces_it_at_full_rank(seed) -> None:
    """(kt x kh x kw) -> (1 x kh x kw) then (kt x 1 x 1), each with its axes of the strides,
    dilations and pads (or the same auto_pad), exact at the split's full rank."""
    from onnx_lowrank.graph.rewrite import replace_units, spatial_decomposition
    from onnx_lowrank.solvers.weights import spatial_filter_reconstruction

    rng = np.random.default_rng(seed)
    model, shape = conv_nd(seed, 3)
    (unit,) = [u for u in find_units(normalise(model)) if u.decomposable]
    d, c, kt, kh, kw = unit.weight.shape
    spatial, temporal = spatial_filter_reconstruction(unit.weight, min(c * kh * kw, d * kt))
    assert spatial.shape[2:] == (1, kh, kw) and temporal.shape[2:] == (kt, 1, 1)
    chain = spatial_decomposition(unit.attrs, spatial, temporal, unit.bias)
    rewritten = replace_units(normalise(model), {unit.name: chain})
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    (expected,), (actual,) = run_model(model, {"input": x}), run_model(rewritten, {"input": x})
    assert actual.shape == expected.shape and relative_error(expected, actual) < 1e-4


def test_asym3d_splits_a_3d_conv_where_it_pays() -> None:
    rng = np.random.default_rng(0)
    b = NetBuilder()
    y = b.node("Relu", [b.node("Conv", ["input", b.const("w0", rng.standard_normal((16, 3, 3, 3, 3)) / 9)],
                               kernel_shape=[3, 3, 3], pads=[1] * 6)])
    y = b.node("Conv", [y, b.const("w1", rng.standard_normal((32, 16, 3, 3, 3)) / 12), b.const("b1", np.zeros(32))],
               kernel_shape=[3, 3, 3], pads=[1] * 6)
    model = finish(b, b.node("Relu", [y]), ["N", 3, 6, 8, 8])
    data = rng.standard_normal((50, 3, 6, 8, 8)).astype(np.float32)
    report = compress(model, 3.0, calibration=data, method="asym3d", bench=False, num_images=40, holdout=10).report
    layer = report.layers[1]
    assert layer.spatial_rank is not None and layer.rank is not None and report.theoretical_speedup >= 3.0
    d_split = layer.spatial_rank
    # exact MACs: (1 x 3 x 3, 16 -> d'') on all 6 input frames, (3 x 1 x 1, d'' -> d'), (1 x 1 x 1, d' -> 32)
    assert layer.flops_after == 2 * 384 * (d_split * (9 * 16 + 3 * layer.rank) + 32 * layer.rank)


def test_a_dense_head_is_left_alone_but_not_a_layer_writing_into_a_residual_stream() -> None:
    from onnx_lowrank.graph.units import OUTPUT_HEAD_REASON

    b = NetBuilder()
    y = b.node("Add", [b.node("MatMul", ["input", b.const("w", np.ones((6, 50)))]), b.const("b", np.ones(50))])
    head = finish(b, b.node("Softmax", [b.node("Reshape", [y, b.const("shape", np.array([-1, 50]))])]), ["N", 6])
    assert [u.skipped_reason for u in find_units(normalise(head))] == [OUTPUT_HEAD_REASON]
    assert all(u.decomposable for u in find_units(normalise(mlp())))


def two_layers(op: str, dims: int):
    """Two layers of one kind in a row (the first conv is left alone by rule: the second is the one a method meets)."""
    rng = np.random.default_rng(dims)
    b = NetBuilder(dims)
    k = [3] * dims
    x = "input"
    for c, d in ((4, 16), (16, 16)):
        shape = (c, d, *k) if op == "ConvTranspose" else (d, c, *k)
        x = b.node("Relu", [b.node(op, [x, b.const("w", rng.standard_normal(shape) / np.sqrt(c * 3 ** dims)),
                                        b.const("b", rng.standard_normal(d) * 0.1)],
                                   kernel_shape=k, pads=[1] * (2 * dims))])
    return finish(b, x, ["N", 4, *[6] * dims]), [4, *[6] * dims]


@pytest.mark.parametrize("method", ["asymmetric", "asym3d", "nonlinear", "linear", "jaderberg", "svd", "tucker2"])
@pytest.mark.parametrize("op, dims", [("Conv", 1), ("Conv", 2), ("Conv", 3), ("ConvTranspose", 2), ("MatMul", 0)])
def test_every_method_decomposes_each_layer_kind_or_says_why_it_leaves_it(method: str, op: str, dims: int) -> None:
    model, shape = (mlp(width=16, hidden=32), [12, 16]) if op == "MatMul" else two_layers(op, dims)
    data = np.random.default_rng(0).standard_normal((40, *shape)).astype(np.float32)
    try:
        result = compress(model, 1.2, calibration=data, method=method, bench=False, rank_multiple=2, threads=1,
                          num_images=32, holdout=8)
    except NothingToDecomposeError as exc:  # every layer left, each with its reason
        assert method in ("jaderberg", "tucker2") and (op, dims) != ("Conv", 2), exc
        return
    except InfeasibleTargetError:
        return
    for layer in result.report.layers:
        decomposed = layer.rank is not None or layer.spatial_rank is not None
        assert decomposed != bool(layer.skipped_reason), layer
    expected, actual = run_model(model, {"input": data[:4]})[0], run_model(result.model, {"input": data[:4]})[0]
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))


def test_a_3d_convs_split_from_a_higher_ranks_basis_is_its_split_run_directly() -> None:
    """A budget search's probe of a 3-D conv: (1 x kh x kw) then (kt x 1 x 1), the basis's taps
    along time (``methods.split_basis``), against the split beside the layer run directly."""
    from onnx_lowrank.methods.chains import Solved, _split_outputs
    from onnx_lowrank.methods.split_basis import spatial_pair
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline.analysis import analyse

    rng = np.random.default_rng(1)
    b = NetBuilder()
    y = b.node("Relu", [b.node("Conv", ["input", b.const("w0", rng.standard_normal((8, 3, 3, 3, 3)) / 9)],
                               kernel_shape=[3, 3, 3], pads=[1] * 6)])
    y = b.node("Conv", [y, b.const("w1", rng.standard_normal((12, 8, 3, 3, 3)) / 12), b.const("b1", np.ones(12))],
               kernel_shape=[3, 3, 3], pads=[1, 0, 1, 1, 0, 1], strides=[2, 1, 1], dilations=[1, 2, 1])
    model = finish(b, b.node("Relu", [y]), ["N", 3, 6, 8, 8])
    data = rng.standard_normal((30, 3, 6, 8, 8)).astype(np.float32)
    analysis = analyse(model, Options(method="asym3d", speedup=2.0, bench=False, threads=1), data, None, None,
                       fixed_target=False)
    unit = analysis.units[1]

    def split_outputs(rank: int, cache: dict | None):
        split = spatial_pair(unit, rank, cache)
        output = _split_outputs(analysis.normalised, [unit], {unit.name: split}, analysis.collect, analysis.shapes,
                                Solved(timings={"collect_asymmetric": 0.0}), cache)[unit.name]
        return output if cache is None else output.output(split[1])  # with a cache, the basis

    cache = {}
    split_outputs(20, cache)
    np.testing.assert_allclose(split_outputs(7, cache), split_outputs(7, None), atol=1e-4)
