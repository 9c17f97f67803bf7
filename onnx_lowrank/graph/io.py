"""Loading and saving ONNX models, with the checks that turn bad files into clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnx_lowrank.errors import ModelLoadError, OutputPathError

# Protobuf cannot serialise a single message over 2 GiB; larger models go to external data.
_PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load (external data included) and check a model, raising ModelLoadError on anything unusable."""
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "the given ModelProto"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf raises several unrelated types on bad bytes
            raise ModelLoadError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})",
                                 hint="is the file truncated or of another format?") from None
    if not model.graph.node:
        raise ModelLoadError(f"{where} holds no graph nodes: not an ONNX model, or an empty one",
                             hint="is the file truncated or of another format?")
    try:
        onnx.checker.check_model(model if model.ByteSize() < _PROTOBUF_LIMIT else str(source))
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{where} fails the ONNX checker: {first_line}") from None
    return model


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike) -> Path:
    out = Path(output_path)
    if out.suffix.lower() != ".onnx":
        raise OutputPathError(f"output path must end in .onnx, got {out}")
    if out.is_dir():
        raise OutputPathError(f"output path {out} is a directory")
    if input_path is not None and out.resolve() == Path(input_path).resolve():
        raise OutputPathError(f"output path {out} is the input model; refusing to overwrite it",
                              hint="write to a new file")
    return out


def save_model_atomic(model: onnx.ModelProto, output_path: str | os.PathLike) -> Path:
    """Write to a temporary file beside the target and rename it, so no half-written model is left."""
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".onnx.tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{out.name}.data"
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.save(model, str(tmp))
        else:
            onnx.save(model, str(tmp), save_as_external_data=True, location=data_name)
        os.replace(tmp, out)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise OutputPathError(f"could not write {out}: {exc}") from None
    return out
