"""Samples per layer sized for the layer's width, within a memory bound."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.planning.sampling import (
    BASE_POSITIONS,
    ResponseShape,
    positions_per_image,
)

GIB = 2**30


def test_wide_layers_get_forty_samples_per_channel_narrow_ones_the_base_count() -> None:
    layers = {"narrow": ResponseShape(16, 56 * 56), "wide": ResponseShape(512, 14 * 14),
              "small_map": ResponseShape(512, 7 * 7)}
    counts = positions_per_image(layers, images=256, memory_bytes=GIB)
    assert counts["narrow"] == BASE_POSITIONS
    assert counts["wide"] * 256 >= 40 * 512 and counts["wide"] == 80
    assert counts["small_map"] == 49  # every position there is, still short of 40 per channel


def test_the_memory_bound_holds_and_keeps_proportions() -> None:
    layers = {f"l{i}": ResponseShape(d, 28 * 28) for i, d in enumerate([64, 128, 256, 512])}
    free = positions_per_image(layers, images=100, memory_bytes=GIB)
    bound = 20 * 2**20
    tight = positions_per_image(layers, images=100, memory_bytes=bound)
    used = sum(100 * tight[name] * shape.channels * 4 for name, shape in layers.items())
    assert used <= bound
    ratios = [tight[name] / free[name] for name in layers]
    assert max(ratios) - min(ratios) < 0.05 and max(ratios) < 1


@pytest.mark.parametrize("images, memory", [(0, GIB), (10, 0)])
def test_bad_arguments(images, memory) -> None:
    with pytest.raises(ValueError):
        positions_per_image({"a": ResponseShape(8, 4)}, images, memory)


def test_the_report_gives_the_samples_of_each_layer() -> None:
    from onnx_lowrank import compress
    from tests.builders import Layer, conv_net

    data = np.random.default_rng(0).standard_normal((40, 3, 10, 10)).astype(np.float32)
    model = conv_net([Layer(16), Layer(32), Layer(64)], size=(10, 10), classifier=5)
    layers = compress(model, 1.5, calibration=data, bench=False, dry_run=True).report.layers
    # 32 calibration samples: 40 * 64 / 32 = 80 positions wanted, the 10 x 10 map has 100; the
    # classifier (a Gemm head, left alone) has none
    assert [layer.samples for layer in layers] == [32 * 32, 32 * 40, 32 * 80, None]
    fixed = compress(model, 1.5, calibration=data, bench=False, dry_run=True, samples_per_image=5).report.layers
    assert [layer.samples for layer in fixed] == [32 * 5] * 3 + [None]


def test_a_batch_holds_no_more_images_than_the_budget_does() -> None:
    from onnx_lowrank.planning.sampling import images_per_batch

    assert images_per_batch(100, 8, 350) == 3
    assert images_per_batch(100, 2, 350) == 2  # never more than asked
    assert images_per_batch(1000, 8, 10) == 1  # at least one
    assert images_per_batch(0, 8, 10) == 8


def test_the_collections_batch_fits_an_eighth_of_the_sample_memory_and_samples_do_not_change() -> None:
    """The layers' outputs per image, from the model's own shapes: a 1 MB budget leaves fewer
    images a batch than the 8 asked; the responses sampled in batches of one are those sampled
    in batches of eight."""
    from onnx_lowrank.options import Options
    from onnx_lowrank.pipeline.analysis import analyse
    from tests.builders import Layer, conv_net

    model = conv_net([Layer(16), Layer(32), Layer(32)], size=(48, 48), classifier=10, seed=2)
    data = np.random.default_rng(3).standard_normal((40, 3, 48, 48)).astype(np.float32)

    def analysed(**options):
        return analyse(model, Options(speedup=1.5, bench=False, threads=1, rank_multiple=8, **options), data, None,
                       None)

    small = analysed(sample_memory_mb=1)
    per_image = sum(4 * small.shapes[u.name].out_channels * small.shapes[u.name].positions
                    for u in small.units if u.decomposable)
    assert small.collect["batch_size"] == max(1, 2**17 // per_image) < 8
    eights, ones = analysed(sample_memory_mb=64), analysed(sample_memory_mb=64, batch_size=1)
    assert eights.collect["batch_size"] == 8 and ones.collect["batch_size"] == 1
    for name, values in eights.responses.items():
        np.testing.assert_allclose(ones.responses[name], values, atol=1e-5)
