"""Reading and writing ONNX models: the checks that turn bad files into clear errors, and the
external-data layout that lets models over protobuf's 2 GiB limit be written and run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from onnx_lowrank.errors import InvalidTypeError, ModelLoadError

# Protobuf cannot serialise a message over 2 GiB; a model whose tensors come near it is written with
# its tensors in a separate data file. Tests lower it to exercise that path on small models.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Tensors smaller than this stay inside the model file (onnx.save's default threshold).
_INLINE_BYTES = 1024
# Page-aligned offsets let onnxruntime map the data file instead of copying it.
_ALIGNMENT = 4096



def load_model(source) -> onnx.ModelProto:
    """Load (external data included) and check a model given as a path, ``os.PathLike``,
    ``onnx.ModelProto`` or serialized bytes; ModelLoadError on anything unusable."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "the given ModelProto"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        model, where = _parse(bytes(source)), "the given model bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = model_path(source)
        where = str(path)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf, onnx and the OS raise many unrelated types on bad files
            raise ModelLoadError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})",
                                 hint="is the file truncated, of another format, or missing its external data?"
                                 ) from None
    else:
        raise InvalidTypeError(f"model must be a path, os.PathLike, onnx.ModelProto or serialized bytes, got "
                               f"{type(source).__name__}")
    if not model.graph.node:
        raise ModelLoadError(f"{where} holds no graph nodes: not an ONNX model, or an empty one",
                             hint="is the file truncated or of another format?")
    try:
        if not is_large(model):
            onnx.checker.check_model(model)
        elif isinstance(source, (str, os.PathLike)):
            onnx.checker.check_model(str(source))
    except Exception as exc:
        raise ModelLoadError(f"{where} fails the ONNX checker: {first_line(exc)}") from None
    return model


def model_path(source: str | os.PathLike) -> Path:
    """``source`` as the path of an existing regular file, or ModelLoadError."""
    try:
        path = Path(source)
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory, not a model file")
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
    except (ValueError, OSError) as exc:  # embedded NUL bytes, names too long
        raise ModelLoadError(f"invalid model path {str(source)!r}: {exc}") from None
    return path


def _parse(data: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as exc:
        raise ModelLoadError(f"the given bytes are not a serialized ONNX model ({type(exc).__name__})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def external_data_files(path: Path) -> list[Path]:
    """The files a model file's tensors live in, besides the model file itself."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    files = set()
    for tensor in _all_tensors(model):
        if uses_external_data(tensor):
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
            if location:
                files.add(path.parent / location)
    return sorted(files)


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensor data held inside the proto (what protobuf would have to serialise)."""
    total = 0
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize \
                if tensor.data_type != onnx.TensorProto.STRING else 1
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def is_large(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def write_model(model: onnx.ModelProto, path: Path, data_name: str) -> list[Path]:
    """Write ``model`` to ``path``; a model too large for one protobuf gets its tensors in
    ``data_name`` beside it. ``model`` itself is not changed. Returns the files written."""
    if not is_large(model):
        path.write_bytes(model.SerializeToString())
        return [path]
    data_path = path.parent / data_name
    with open(data_path, "wb") as data:
        light = _with_external_tensors(model, data, data_name)
    path.write_bytes(light.SerializeToString())
    return [path, data_path]


def _with_external_tensors(model: onnx.ModelProto, data, location: str) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are written to ``data`` and referenced from it.
    Built field by field so that the tensors are never copied as a whole."""
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) or tensor.data_type == onnx.TensorProto.STRING:
            graph.initializer.append(tensor)
            continue
        values = numpy_helper.to_array(tensor)
        if values.nbytes < _INLINE_BYTES:
            graph.initializer.append(tensor)
            continue
        offset = -data.tell() % _ALIGNMENT + data.tell()
        data.seek(offset)
        data.write(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
        reference = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                                     doc_string=tensor.doc_string)
        reference.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", values.nbytes)):
            reference.external_data.add(key=key, value=str(value))
        graph.initializer.append(reference)
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    light.graph.CopyFrom(graph)
    return light


def _copy_field(target, field, value) -> None:
    # protobuf >= 6 says is_repeated; older releases only have the label.
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on the model, through a temporary file with external data when it is large."""
    if not is_large(model):
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-") as folder:
        path = Path(folder) / "model.onnx"
        write_model(model, path, "model.onnx.data")
        onnx.checker.check_model(str(path))
