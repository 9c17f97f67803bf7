"""Reading and writing ONNX models: the checks that turn bad files into clear errors, and the
external-data layout that lets models over protobuf's 2 GiB limit be written and run."""

from __future__ import annotations

import functools
import mmap
import os
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
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
# Initializers from this size go to onnxruntime sessions as arrays, not serialised with the graph
# (``weights_apart``); smaller ones (shapes, indices, small biases) cost nothing to serialise.
WEIGHT_BYTES = 64 * 2**10



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
            model = _load_file(path)
        except (DecodeError, ValueError, OSError, onnx.checker.ValidationError) as exc:  # what a bad file raises
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
        if isinstance(source, (str, os.PathLike)):  # the checker reads the file faster than a proto is serialised
            onnx.checker.check_model(str(source))
        elif not is_large(model):
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, OSError) as exc:  # what the checker raises on a bad model
        raise ModelLoadError(f"{where} fails the ONNX checker: {first_line(exc)}") from None
    return model


def _load_file(path: Path) -> onnx.ModelProto:
    """The model in ``path`` with its external data: loaded, or, for a model too large for one
    protobuf, left in the user's files (read in place as memory maps, never written)."""
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        return model
    if tensor_bytes(model) + sum(_nbytes(t) for t in external) < EXTERNAL_DATA_THRESHOLD:
        onnx.load_external_data_for_model(model, str(path.parent))
        return model
    folder = path.parent.resolve()
    for tensor in external:
        entry = next(entry for entry in tensor.external_data if entry.key == "location")
        data = (folder / entry.value).resolve()
        if folder not in data.parents or not data.is_file():
            raise ModelLoadError(f"{path}: external data {entry.value!r} of tensor {tensor.name!r} is not a file "
                                 f"in the model's folder")
        entry.value = str(data)
        _INPUT_FILES.add(str(data))
    for tensor in _all_tensors(model):  # tensors of If/Loop bodies, usually small, are loaded
        if uses_external_data(tensor) and WeightStore.of(tensor) is None:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
    return model


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _memmap(path: Path, tensor: onnx.TensorProto) -> np.ndarray:
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    return np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


class _InputData:
    """The external-data files of a large input model, read in place."""

    @staticmethod
    def array(tensor: onnx.TensorProto) -> np.ndarray:
        location = next(entry.value for entry in tensor.external_data if entry.key == "location")
        return _memmap(Path(location), tensor)


_INPUT_FILES: set[str] = set()  # absolute paths of the data files large input models reference


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
    except (DecodeError, ValueError) as exc:
        raise ModelLoadError(f"the given bytes are not a serialized ONNX model ({type(exc).__name__})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def external_data_files(path: Path) -> list[Path]:
    """The files a model file's tensors live in, besides the model file itself."""
    try:
        stat = path.stat()
    except OSError:
        return []
    return list(_external_data_files(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _external_data_files(path: str, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """By the file's modification time and size: a run asks about its input more than once, and
    parsing a large model takes a second each time. A file without the key every reference names
    its file under is not parsed at all (most models: 0.5 s and a transient copy on VGG-16)."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"location") < 0:
                return ()
    except (OSError, ValueError):  # unreadable, or empty (no map of length 0): as the parse finds it
        pass
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, OSError):  # not a model: it references no files
        return ()
    files = set()
    for tensor in _all_tensors(model):
        if uses_external_data(tensor):
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
            if location:
                files.add(Path(path).parent / location)
    return tuple(sorted(files))


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data a write of ``model`` carries: what the proto holds, and what it keeps in a WeightStore."""
    return sum(_nbytes(t) for t in _all_tensors(model) if not uses_external_data(t) or WeightStore.of(t) is not None)


def is_large(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def write_model(model: onnx.ModelProto, path: Path, data_name: str) -> list[Path]:
    """Write ``model`` to ``path``, self-contained; a model too large for one protobuf gets its
    tensors in ``data_name`` beside it. ``model`` itself is not changed. Returns the files written."""
    if not is_large(model):
        path.write_bytes(_rebuilt(model, lambda tensor, values: _inline(tensor, values)).SerializeToString()
                         if _has_stored(model) else model.SerializeToString())
        return [path]
    data_path = path.parent / data_name
    with open(data_path, "wb") as data:
        light = _rebuilt(model, lambda tensor, values: _append(data, data_name, tensor, values))
    path.write_bytes(light.SerializeToString())
    return [path, data_path]


def _has_stored(model: onnx.ModelProto) -> bool:
    return any(WeightStore.of(tensor) is not None for tensor in model.graph.initializer)


def _has_input_data(model: onnx.ModelProto) -> bool:
    return any(isinstance(WeightStore.of(tensor), _InputData) for tensor in model.graph.initializer)


def _rebuilt(model: onnx.ModelProto, place, keep_in=None) -> onnx.ModelProto:
    """A copy of ``model`` in which each initializer of at least 1 KiB, except those held in the store
    ``keep_in``, is replaced by ``place(tensor, values)``. Built field by field, so the tensors
    themselves are never copied as a whole."""
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    for tensor in model.graph.initializer:
        store = WeightStore.of(tensor)
        if tensor.data_type == onnx.TensorProto.STRING or (uses_external_data(tensor) and store is None) \
                or (store is not None and store is keep_in):
            graph.initializer.append(tensor)
            continue
        values = store.array(tensor) if store is not None else numpy_helper.to_array(tensor)
        if values.nbytes >= _INLINE_BYTES:
            graph.initializer.append(place(tensor, values))
        else:
            graph.initializer.append(_inline(tensor, values) if store is not None else tensor)
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    light.graph.CopyFrom(graph)
    return light


def _inline(tensor: onnx.TensorProto, values: np.ndarray) -> onnx.TensorProto:
    inline = numpy_helper.from_array(np.asarray(values), tensor.name)
    inline.data_type = tensor.data_type  # from_array cannot tell bfloat16 and friends from their storage type
    return inline


def _append(data, location: str, tensor: onnx.TensorProto, values: np.ndarray) -> onnx.TensorProto:
    """Write ``values`` to the open data file at the next page-aligned offset; the reference to them."""
    offset = -data.tell() % _ALIGNMENT + data.tell()
    data.seek(offset)
    data.write(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    return _reference(tensor, location, offset, values.nbytes)


def _reference(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    reference = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                                 doc_string=tensor.doc_string)
    reference.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        reference.external_data.add(key=key, value=str(value))
    return reference


def names_read_by_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that an If/Loop/Scan body may read."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names.update(names_read_by_subgraphs(inner))
    return names


def weights_apart(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A light copy of ``model`` whose inline initializers of ``WEIGHT_BYTES`` or more are external
    data at no location, and their values: onnxruntime takes those as arrays
    (``SessionOptions.add_external_initializers``) instead of serialising and parsing them with the
    graph (on a 528 MB VGG-16, a second or two per session, and a copy of the weights)."""
    arrays: dict[str, np.ndarray] = {}
    read = {name for node in model.graph.node for name in (*node.input, *names_read_by_subgraphs(node))} \
        | {value.name for value in model.graph.output}

    def place(tensor: onnx.TensorProto, values: np.ndarray) -> onnx.TensorProto:
        # A type numpy stores as another (bfloat16 and friends) stays in the graph, and so does a
        # tensor nothing reads: onnxruntime drops it on load, then finds no tensor to hand it to.
        if values.dtype.kind not in "fiub" or onnx.helper.np_dtype_to_tensor_dtype(values.dtype) != tensor.data_type \
                or tensor.name not in read or values.nbytes < WEIGHT_BYTES:
            return tensor
        arrays[tensor.name] = np.ascontiguousarray(values)
        return _reference(tensor, "in memory", 0, values.nbytes)

    return _rebuilt(model, place), arrays


class WeightStore:
    """The large tensors of the models one run derives from a large input, in one data file of a
    private temporary folder. Models that reference it are light protos: copying them, cutting
    sub-graphs or exposing outputs costs no weight copies, their weights are read as memory maps,
    and onnxruntime sessions load them from a model file written beside the data. The folder is
    removed with the store. ``write_model`` writes such a model out self-contained."""

    _open: "weakref.WeakValueDictionary[str, WeightStore]" = weakref.WeakValueDictionary()  # by data-file name

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="onnx-lowrank-")
        self.folder = Path(self._folder.name)
        self.location = f"{self.folder.name}.data"
        self._data = open(self.folder / self.location, "wb")
        self._sessions = 0
        WeightStore._open[self.location] = self

    @classmethod
    def of(cls, tensor: onnx.TensorProto) -> "WeightStore | _InputData | None":
        """Where a tensor's values are kept: a store, a large input's own data file, or None (inline)."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
        return _InputData() if location in _INPUT_FILES else cls._open.get(location)

    @classmethod
    def holding(cls, model: onnx.ModelProto) -> "WeightStore | None":
        return next((store for store in map(cls.of, model.graph.initializer) if isinstance(store, cls)), None)

    def keep(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A light copy of ``model`` whose large inline tensors now live in this store."""
        light = _rebuilt(model, lambda tensor, values: _append(self._data, self.location, tensor, values),
                         keep_in=self)
        self._data.flush()
        return light

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return _memmap(self.folder / self.location, tensor)

    def model_file(self, model: onnx.ModelProto) -> Path:
        """A model file beside the data, for onnxruntime or the checker; the caller removes it."""
        self._sessions += 1
        path = self.folder / f"model-{self._sessions}.onnx"
        inline = tensor_bytes(model) - _stored_bytes(model)
        light = self.keep(model) if inline >= EXTERNAL_DATA_THRESHOLD or _has_input_data(model) else model
        path.write_bytes(light.SerializeToString())
        return path


def _stored_bytes(model: onnx.ModelProto) -> int:
    return sum(_nbytes(t) for t in model.graph.initializer if WeightStore.of(t) is not None)


def stored_array(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The values of a tensor kept in a WeightStore (a read-only memory map), else None."""
    store = WeightStore.of(tensor)
    return store.array(tensor) if store is not None else None


def _copy_field(target, field, value) -> None:
    # protobuf >= 6 says is_repeated; older releases only have the label.
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def needs_file(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can only be read from a file: too large for one protobuf, or weights kept on disk."""
    return is_large(model) or _has_stored(model)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on the model, through a file with external data when it needs one."""
    if not needs_file(model):
        onnx.checker.check_model(model)
        return
    with model_file(model) as path:
        onnx.checker.check_model(str(path))


@contextmanager
def model_file(model: onnx.ModelProto):
    """A file of ``model`` with its data reachable, for tools that take a path; removed afterwards."""
    store = WeightStore.holding(model)
    if store is not None:
        path = store.model_file(model)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-") as folder:
        path = Path(folder) / "model.onnx"
        write_model(model, path, "model.onnx.data")
        yield path
