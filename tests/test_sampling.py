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
