"""Fixtures shared by the test modules; graph builders are in ``tests/builders.py``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.builders import Layer, conv_net


@pytest.fixture
def folder(tmp_path):
    """A small classifier ``in.onnx`` and 40 calibration samples ``calib.npz`` in a fresh folder."""
    onnx.save(conv_net([Layer(16), Layer(32), Layer(32)], size=(10, 10), classifier=5), tmp_path / "in.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.standard_normal((40, 3, 10, 10)).astype(np.float32))
    return tmp_path
