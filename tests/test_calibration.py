"""Calibration sources: folders, npy, npz, reader scripts, random inputs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from PIL import Image

from onnx_lowrank.errors import CalibrationError, InvalidOptionError
from onnx_lowrank.runtime.calibration import InputSpec, open_calibration
from onnx_lowrank.runtime.images import make_preprocess

NCHW = InputSpec("input", (None, 3, 8, 10), np.dtype(np.float32))
NHWC = InputSpec("input", (None, 8, 10, 3), np.dtype(np.float32))


def write_images(folder, count: int, size=(20, 16)) -> None:
    (folder / "nested" / "deeper").mkdir(parents=True)
    for i in range(count):
        where = folder / "nested" / "deeper" if i % 2 else folder
        Image.fromarray(np.full((size[1], size[0], 3), (200, 100, 50), np.uint8)).save(where / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")


def test_image_folder_is_read_recursively_resized_and_normalised(tmp_path) -> None:
    write_images(tmp_path, 5)
    source = open_calibration(tmp_path, [NCHW], preprocess=make_preprocess("imagenet"))
    assert len(source) == 5
    batch = source.get([0, 3])["input"]
    assert batch.shape == (2, 3, 8, 10) and batch.dtype == np.float32
    expected = (np.array([200, 100, 50]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(batch[1, :, 4, 5], expected, rtol=1e-5)


def test_nhwc_and_caffe_preset(tmp_path) -> None:
    write_images(tmp_path, 2)
    source = open_calibration(tmp_path, [NHWC], preprocess=make_preprocess("caffe"))
    pixel = source.get([0])["input"][0, 3, 3]
    np.testing.assert_allclose(pixel, [50 - 103.939, 100 - 116.779, 200 - 123.68], rtol=1e-5)


def test_overrides_beat_the_preset(tmp_path) -> None:
    write_images(tmp_path, 1)
    pre = make_preprocess("tf", mean=[127.0], std=[128.0], scale=1.0)
    pixel = open_calibration(tmp_path, [NCHW], preprocess=pre).get([0])["input"][0, :, 0, 0]
    np.testing.assert_allclose(pixel, (np.array([200, 100, 50]) - 127) / 128, rtol=1e-5)


def test_npy_and_npz(tmp_path) -> None:
    data = np.random.default_rng(0).standard_normal((7, 3, 8, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    np.savez(tmp_path / "x.npz", input=data, labels=np.arange(7))
    np.testing.assert_array_equal(open_calibration(tmp_path / "x.npy", [NCHW]).get([2, 4])["input"], data[[2, 4]])
    source = open_calibration(tmp_path / "x.npz", [NCHW])
    assert len(source) == 7 and list(source.labels) == list(range(7))


def test_reader_script(tmp_path) -> None:
    script = tmp_path / "reader.py"
    script.write_text(textwrap.dedent("""
        import numpy as np

        class Reader:
            def __init__(self):
                self.batches = iter([np.full((2, 3, 8, 10), i, np.float32) for i in range(3)])

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {"input": batch}
    """))
    source = open_calibration(f"{script}:Reader", [NCHW])
    assert len(source) == 6
    assert source.get([5])["input"].max() == 2


def test_random_inputs_are_reproducible() -> None:
    first = open_calibration(None, [NCHW], random_count=4, seed=3)
    again = open_calibration(None, [NCHW], random_count=4, seed=3)
    assert len(first) == 4
    np.testing.assert_array_equal(first.get([1, 2])["input"], again.get([1, 2])["input"])
    assert first.get([0])["input"].shape == (1, 3, 8, 10)


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "missing.npz", "not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images"),
    (lambda p: np.save(p / "bad.npy", np.zeros((4, 1, 8, 10), np.float32)) or p / "bad.npy", "has shape"),
    (lambda p: np.save(p / "flat.npy", np.zeros((4, 240), np.float32)) or p / "flat.npy", "has shape"),
    (lambda p: np.savez(p / "other.npz", a=np.zeros((4, 3, 8, 10)), b=np.zeros(4)) or p / "other.npz",
     "no array for model input"),
    (lambda p: np.save(p / "zero.npy", np.zeros((0, 3, 8, 10), np.float32)) or p / "zero.npy", "no samples"),
    (lambda p: (p / "r.py").write_text("x = 1") and f"{p / 'r.py'}:Reader", "defines no 'Reader'"),
    (lambda p: (p / "data.csv").write_text("1,2") and p / "data.csv", "unsupported"),
])
def test_bad_calibration_is_a_clear_error(tmp_path, make_bad, message) -> None:
    with pytest.raises(CalibrationError, match=message):
        open_calibration(make_bad(tmp_path), [NCHW])


def test_dynamic_spatial_size_needs_input_size(tmp_path) -> None:
    write_images(tmp_path, 1)
    dynamic = InputSpec("input", (None, 3, None, None), np.dtype(np.float32))
    with pytest.raises(CalibrationError, match="--input-size"):
        open_calibration(tmp_path, [dynamic])
    source = open_calibration(tmp_path, [dynamic], input_size=(6, 6))
    assert source.get([0])["input"].shape == (1, 3, 6, 6)


def test_unknown_preset() -> None:
    with pytest.raises(InvalidOptionError, match="choose one of imagenet"):
        make_preprocess("bogus")
