"""The library as an API: every accepted form of model and data, and wrong types or values raising a
LowRankError that names the parameter, never a TypeError from deep inside."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_lowrank
from onnx_lowrank import LowRankError, compress
from onnx_lowrank.errors import InvalidTypeError, ModelLoadError
from tests.builders import Layer, conv_net

FAST = dict(speedup=1.5, bench=False, threads=1)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return conv_net([Layer(16), Layer(32), Layer(32)], size=(10, 10), classifier=5)


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((40, 3, 10, 10)).astype(np.float32)


class Reader:
    """onnxruntime's CalibrationDataReader shape: batches of 4, then None."""

    def __init__(self, samples: np.ndarray) -> None:
        self.batches = iter(np.split(samples, 10))

    def get_next(self):
        return next(({"input": batch} for batch in self.batches), None)


@pytest.mark.slow
def test_every_model_form_gives_the_same_result(model, samples, tmp_path) -> None:
    onnx.save(model, tmp_path / "m.onnx")
    forms = [str(tmp_path / "m.onnx"), tmp_path / "m.onnx", model, model.SerializeToString()]
    reports = [compress(form, calibration=samples, **FAST).report for form in forms]
    errors = {tuple(r.fidelity.output_rel_error.values()) for r in reports}
    assert len(errors) == 1 and all(r.layers[1].rank == reports[0].layers[1].rank for r in reports)
    assert reports[0].files["input"]["sha256"] and reports[2].files["input"] is None


@pytest.mark.slow
def test_every_data_form_gives_the_same_result(model, samples, tmp_path) -> None:
    np.save(tmp_path / "x.npy", samples)
    forms = [samples, {"input": samples}, Reader(samples), str(tmp_path / "x.npy"), tmp_path / "x.npy"]
    errors = {tuple(compress(model, calibration=form, **FAST).report.fidelity.output_rel_error.values())
              for form in forms}
    assert len(errors) == 1


def test_evaluation_as_a_dict_with_labels(model, samples) -> None:
    labels = np.arange(40) % 5
    fidelity = compress(model, calibration=samples, evaluation={"input": samples, "labels": labels}, **FAST
                        ).report.fidelity
    assert fidelity.samples == 40 and fidelity.accuracy_original is not None


def test_single_strings_where_sequences_are_expected(model, samples) -> None:
    names = [layer.name for layer in compress(model, calibration=samples, dry_run=True, **FAST).report.layers]
    report = compress(model, calibration=samples, skip=names[2], providers="cpu", speedup=1.2, bench=False,
                      rank_multiple=4).report
    assert report.layers[2].skipped_reason == "skipped by --skip"


@pytest.mark.parametrize("keyword, value, named", [
    ("threads", "2", "threads"), ("seed", "x", "seed"), ("seed", -1, "seed"), ("input_size", (0, 0), "input_size"),
    ("input_size", "224x224", "input_size"), ("speedup", "4", "speedup"), ("speedup", float("nan"), "speedup"),
    ("num_images", 2.5, "num_images"), ("bench", "yes", "bench"), ("skip", 3, "skip"), ("providers", ["tpu"],
                                                                                        "provider"),
    ("method", None, "method"), ("rank_multiple", True, "rank_multiple"), ("calibration", 42, "calibration"),
    ("evaluation", object(), "evaluation")])
def test_wrong_types_and_values_name_the_parameter(model, samples, keyword, value, named) -> None:
    arguments = {"calibration": samples, **FAST, keyword: value}
    with pytest.raises(LowRankError) as error:
        compress(model, **arguments)
    assert named.replace("_", " ") in str(error.value) or named in str(error.value)


@pytest.mark.parametrize("bad", [None, 42, b"not a model", Path("/nonexistent/model.onnx"), "\0bad"])
def test_a_bad_model_argument_is_a_lowrank_error(bad) -> None:
    with pytest.raises((InvalidTypeError, ModelLoadError)) as error:
        compress(bad, calibration=None, **FAST)
    assert "model" in str(error.value)


def test_type_errors_are_also_type_errors() -> None:
    with pytest.raises(TypeError):
        compress(None)


def test_the_package_is_typed() -> None:
    assert (Path(onnx_lowrank.__file__).parent / "py.typed").is_file()
    signature = inspect.signature(compress)
    assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
    assert signature.return_annotation is not inspect.Signature.empty


def test_absurd_thread_counts_are_refused(model, samples) -> None:
    with pytest.raises(LowRankError, match="threads must be at most 256"):
        compress(model, calibration=samples, **{**FAST, "threads": 10_000})
