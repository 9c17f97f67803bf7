"""Calibration inputs: image folders, .npy/.npz arrays, CalibrationDataReader scripts, or random data.

Every source is indexable (``source.get(indices)`` returns ``{input_name: batch}``), so images are
read only when a batch needs them and calibration and held-out sets are disjoint index ranges.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, Union

import numpy as np
import onnx

from onnx_lowrank.errors import CalibrationError, InvalidTypeError, ModelLoadError
from onnx_lowrank.runtime.images import PRESETS, ImageFolderSource, Preprocess, _spatial_size
from onnx_lowrank.userfiles import load_from_file, names_file

log = logging.getLogger(__name__)


class CalibrationDataReader(Protocol):
    """onnxruntime's reader interface: ``get_next()`` returns ``{input_name: batch}``, then None."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


# What --calib and --eval accept, from the command line and the library alike.


CalibrationSource = Union[str, os.PathLike, np.ndarray, Mapping[str, Any], CalibrationDataReader, None]


LABELS_KEY = "labels"


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (``None`` for a dynamic dimension) and NumPy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def layout(self) -> str | None:
        """``NCHW`` or ``NHWC`` for 4-D image inputs (tf2onnx exports NHWC), else None."""
        if len(self.shape) != 4:
            return None
        if self.shape[1] in (1, 3):
            return "NCHW"
        if self.shape[3] in (1, 3):
            return "NHWC"
        return None

    @property
    def channel_axis(self) -> int:
        return 1 if self.layout == "NCHW" else 3

    @property
    def spatial_axes(self) -> tuple[int, int]:
        return (2, 3) if self.layout == "NCHW" else (1, 2)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = None
        if value.type.HasField("tensor_type") and tensor_type.elem_type != onnx.TensorProto.STRING:
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            except (KeyError, TypeError, ValueError):
                pass
        if dtype is None or dtype.kind not in "biuf":
            kind = value.type.WhichOneof("value") or "untyped value"
            raise ModelLoadError(f"model input {value.name!r} is a {kind} of element type {tensor_type.elem_type}: "
                                 "onnx-lowrank feeds numeric tensor inputs only")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dims, dtype))
    if not specs:
        raise ModelLoadError("the model has no inputs to feed calibration data to")
    return specs


class ArraySource:
    """Calibration samples already in memory (from .npy, .npz or a reader script)."""

    views_together = True  # rows made from one picture usually sit next to each other

    def __init__(self, arrays: dict[str, np.ndarray], inputs: list[InputSpec], origin: str,
                 labels: np.ndarray | None = None) -> None:
        self.description = origin
        self.arrays = {spec.name: _checked_array(arrays, spec, origin) for spec in inputs}
        counts = {len(a) for a in self.arrays.values()}
        if len(counts) != 1:
            raise CalibrationError(f"{origin}: inputs have different sample counts {sorted(counts)}")
        self.count = counts.pop()
        if self.count == 0:
            raise CalibrationError(f"{origin} holds no samples")
        self.labels = None if labels is None else _checked_labels(labels, self.count, origin)

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(a[list(indices)]) for name, a in self.arrays.items()}


def _checked_array(arrays: dict[str, np.ndarray], spec: InputSpec, origin: str) -> np.ndarray:
    if spec.name not in arrays:
        raise CalibrationError(f"{origin} has no array for model input {spec.name!r} "
                               f"(it has {sorted(arrays)})", hint="key .npz arrays by input name")
    array = np.asarray(arrays[spec.name])
    if array.dtype.kind not in "biuf":
        raise CalibrationError(f"{origin}: array for input {spec.name!r} has dtype {array.dtype}, not real numbers",
                               hint=f"the model expects {spec.dtype}")
    expected = tuple("N" if i == 0 else (d if d is not None else "?") for i, d in enumerate(spec.shape))
    fits = array.ndim == len(spec.shape) and all(
        d is None or d == a for i, (d, a) in enumerate(zip(spec.shape, array.shape)) if i > 0)
    if not fits:
        raise CalibrationError(f"{origin}: array for input {spec.name!r} has shape {array.shape}, "
                               f"the model expects {expected}", hint="the first axis counts samples")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise CalibrationError(f"{origin}: array for input {spec.name!r} contains NaN or infinity")
    return array.astype(spec.dtype, copy=False)


def _checked_labels(labels: Any, count: int, origin: str) -> np.ndarray:
    """Class indices, one per sample; integral floats are accepted, one-hot rows are not guessed at."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise CalibrationError(f"{origin}: labels have shape {array.shape}; expected one class index per sample, "
                               f"shape ({count},)", hint="for one-hot labels pass labels.argmax(axis=1)")
    if len(array) != count:
        raise CalibrationError(f"{origin}: {len(array)} labels for {count} samples",
                               hint="give one class index per sample")
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or (array.size and array.min() < 0):
        raise CalibrationError(f"{origin}: labels must be non-negative class indices, got dtype {array.dtype}"
                               + (f" with values like {array[:3].tolist()}" if array.size else ""))
    return array


class RandomSource:
    """Standard-normal inputs: a stand-in that exercises the pipeline but calibrates poorly."""

    def __init__(self, inputs: list[InputSpec], count: int, seed: int,
                 input_size: tuple[int, int] | None) -> None:
        self.description = "random normal inputs"
        self.labels = None
        self.count = count
        self.seed = seed
        self.shapes = {}
        for spec in inputs:
            dims = list(spec.shape)
            if spec.layout is not None:
                for axis, size in zip(spec.spatial_axes, _spatial_size(spec, input_size)):
                    dims[axis] = size
            if any(d is None for d in dims[1:]):
                raise CalibrationError(f"input {spec.name!r} has dynamic dimensions {spec.shape}",
                                       hint="give --calib data, or --input-size HxW for images")
            self.shapes[spec.name] = (tuple(dims[1:]), spec.dtype)

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        out = {}
        for name, (dims, dtype) in self.shapes.items():
            rows = [np.random.default_rng([self.seed, i]).standard_normal(dims) for i in indices]
            out[name] = np.stack(rows).astype(dtype)
        return out


def open_calibration(calib: CalibrationSource, inputs: list[InputSpec], *,
                     preprocess: Preprocess | None = None, random_count: int = 64, seed: int = 0,
                     input_size: tuple[int, int] | None = None, limit: int | None = None,
                     role: str = "calibration"):
    """Turn what the user gave as ``--calib`` (or ``--eval``: ``role``) into an indexable source;
    None means random data. At most ``limit`` samples are read from a reader (one may never end)."""
    if calib is None:
        return RandomSource(inputs, random_count, seed, input_size)
    if hasattr(calib, "get_next"):
        return _read_reader(calib, inputs, type(calib).__name__, limit)
    if isinstance(calib, np.ndarray):
        return ArraySource(_single_input(calib, inputs, "a NumPy array"), inputs, f"{role} array")
    if isinstance(calib, Mapping):
        arrays = dict(calib)
        labels = arrays.pop(LABELS_KEY, None)
        return ArraySource(arrays, inputs, f"{role} arrays", labels)
    if not isinstance(calib, (str, os.PathLike)):
        raise InvalidTypeError(f"{role} must be a path, a NumPy array, a dict of arrays or an object with "
                               f"get_next(), got {type(calib).__name__}")
    text = os.fspath(calib)
    try:
        path = Path(text)
        is_dir, exists = path.is_dir(), path.exists()
    except (ValueError, OSError) as exc:
        raise CalibrationError(f"invalid {role} path {text!r}: {exc}") from None
    if is_dir:
        if len(inputs) != 1:
            raise CalibrationError(f"an image folder can feed a single-input model; this one has "
                                   f"{len(inputs)} inputs", hint="use an .npz keyed by input name")
        return ImageFolderSource(path, inputs[0], preprocess or PRESETS["imagenet"], input_size)
    if names_file(text):
        return _load_reader_script(text, inputs, limit)
    if not exists:
        raise CalibrationError(f"{role} data not found: {text}",
                               hint="give an image folder, .npy, .npz or file.py:ReaderName")
    if path.suffix == ".npy":
        return ArraySource(_single_input(_load_numpy(path), inputs, "a .npy file"), inputs, str(path))
    if path.suffix == ".npz":
        arrays = _load_numpy(path)
        labels = arrays.pop(LABELS_KEY, None)
        if len(inputs) == 1 and inputs[0].name not in arrays and len(arrays) == 1:
            arrays = {inputs[0].name: next(iter(arrays.values()))}
        return ArraySource(arrays, inputs, str(path), labels)
    raise CalibrationError(f"unsupported {role} data {text}",
                           hint="give an image folder, .npy, .npz or file.py:ReaderName")


def _single_input(array: np.ndarray, inputs: list[InputSpec], what: str) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        raise CalibrationError(f"{what} can feed a single-input model; this one has {len(inputs)} inputs",
                               hint="use an .npz or a dict keyed by input name")
    return {inputs[0].name: array}


def _load_numpy(path: Path):
    try:
        loaded = np.load(path, allow_pickle=False)
        return dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # what np.load raises on a bad file
        raise CalibrationError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def _load_reader_script(text: str, inputs: list[InputSpec], limit: int | None):
    target = load_from_file(text, CalibrationError, "reader")
    try:
        reader = target() if isinstance(target, type) or not hasattr(target, "get_next") else target
    except (Exception, SystemExit) as exc:
        raise CalibrationError(f"could not create the reader {text}: {type(exc).__name__}: {exc}") from None
    if not hasattr(reader, "get_next"):
        raise CalibrationError(f"{text} is not a CalibrationDataReader (it has no get_next())")
    return _read_reader(reader, inputs, text, limit)


def _read_reader(reader, inputs: list[InputSpec], origin: str, limit: int | None) -> ArraySource:
    """Everything ``reader`` yields, up to ``limit`` samples (a reader that never ends is cut there)."""
    batches: dict[str, list[np.ndarray]] = {spec.name: [] for spec in inputs}
    count = 0
    while limit is None or count < limit:
        try:
            item = reader.get_next()
        except (Exception, SystemExit) as exc:
            raise CalibrationError(f"{origin}.get_next() failed: {type(exc).__name__}: {exc}") from None
        if item is None:
            break
        if not isinstance(item, Mapping):
            raise CalibrationError(f"{origin}.get_next() returned {type(item).__name__}, expected a dict or None")
        for spec in inputs:
            if spec.name not in item:
                raise CalibrationError(f"{origin}.get_next() gave no array for input {spec.name!r}")
            batches[spec.name].append(np.asarray(item[spec.name]))
        first = batches[inputs[0].name][-1]
        count += len(first) if first.ndim == len(inputs[0].shape) else 1
    if not batches[inputs[0].name]:
        raise CalibrationError(f"{origin} produced no samples")
    try:
        arrays = {name: _as_batch(parts, spec) for (name, parts), spec in zip(batches.items(), inputs)}
    except ValueError as exc:
        raise CalibrationError(f"{origin} produced batches of inconsistent shapes: {exc}") from None
    if limit is not None:
        arrays = {name: array[:limit] for name, array in arrays.items()}
    return ArraySource(arrays, inputs, origin)


def _as_batch(parts: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Reader items are batches (N, ...) as onnxruntime's readers give; a single sample is batch 1."""
    parts = [part[None] if part.ndim == len(spec.shape) - 1 else part for part in parts]
    return np.concatenate(parts)
