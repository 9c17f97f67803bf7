"""The held-out part behind every fidelity figure is disjoint from calibration by source."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.options import Options
from onnx_lowrank.pipeline.analysis import _split
from onnx_lowrank.runtime.calibration import ArraySource, InputSpec, RandomSource

SPEC = [InputSpec("input", (None, 3, 4, 4), np.dtype(np.float32))]


def test_arrays_hold_out_the_block_at_the_end() -> None:
    """Eight views of each picture in a row, as augmentation scripts write them: no picture may have
    views on both sides of the split."""
    pictures = np.repeat(np.arange(50), 8)
    source = ArraySource({"input": np.zeros((400, 3, 4, 4), np.float32)}, SPEC, "views")
    calib, holdout = _split(source, Options(holdout=80, num_images=300), [])
    assert holdout == list(range(320, 400))
    assert not set(pictures[calib]) & set(pictures[holdout])
    assert len(calib) == 300 and not set(calib) & set(holdout)


def test_sources_of_one_sample_each_are_held_out_at_random() -> None:
    calib, holdout = _split(RandomSource(SPEC, 200, 0, (4, 4)), Options(holdout=40), [])
    assert len(holdout) == 40 and holdout != list(range(160, 200)) and not set(calib) & set(holdout)


def test_few_held_out_samples_warn_and_every_figure_gives_its_count() -> None:
    from onnx_lowrank import compress
    from tests.builders import Layer, conv_net

    data = np.random.default_rng(0).standard_normal((40, 3, 10, 10)).astype(np.float32)
    report = compress(conv_net([Layer(16), Layer(32), Layer(32)], size=(10, 10), classifier=5), 1.5,
                      calibration=data, bench=False)
    assert any("only 8 held-out samples" in warning for warning in report.report.warnings)
    from io import StringIO

    from rich.console import Console

    from onnx_lowrank.output.report import render

    console = Console(file=StringIO(), width=120)
    render(report.report, console)
    rows = [line for line in console.file.getvalue().splitlines() if "agreement" in line or "L2 error" in line]
    assert rows and all("(n=8)" in row for row in rows)


def test_augmented_views_stay_on_the_calibration_side(tmp_path) -> None:
    from PIL import Image

    from onnx_lowrank import compress
    from onnx_lowrank.runtime.images import PRESETS, AugmentedViews, ImageFolderSource
    from tests.builders import Layer, conv_net

    for index in range(15):
        pixels = (np.random.default_rng(index).random((20, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"p{index:02d}.png")
    spec = InputSpec("input", (None, 3, 10, 10), np.dtype(np.float32))
    folder = ImageFolderSource(tmp_path, spec, PRESETS["raw"], None)
    views = AugmentedViews(folder, [0, 5], 4, seed=0).get(range(8))["input"]
    plain = folder.get([0])["input"][0]
    assert np.allclose(views[0], plain) and np.allclose(views[1], plain[:, :, ::-1], atol=0.05)
    assert not np.allclose(views[2], plain) and not np.allclose(views[2], views[3])
    report = compress(conv_net([Layer(16), Layer(32), Layer(32)], size=(10, 10), classifier=5), 1.5,
                      calibration=str(tmp_path), bench=False, augment=4, preprocess=PRESETS["raw"]).report
    assert report.calibration_samples == 4 * 12 and report.fidelity.samples == 3
    with pytest.raises(Exception, match="image folder"):
        compress(conv_net([Layer(16), Layer(32)], size=(10, 10)), 1.5, calibration=folder.get(range(15))["input"],
                 bench=False, augment=2)
