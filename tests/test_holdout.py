"""The held-out part behind every fidelity figure is disjoint from calibration by source."""

from __future__ import annotations

import numpy as np

from onnx_lowrank.api import _split
from onnx_lowrank.calibration import ArraySource, InputSpec, RandomSource
from onnx_lowrank.options import Options

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

    from onnx_lowrank.report import render

    console = Console(file=StringIO(), width=120)
    render(report.report, console)
    rows = [line for line in console.file.getvalue().splitlines() if "agreement" in line or "L2 error" in line]
    assert rows and all("(n=8)" in row for row in rows)
