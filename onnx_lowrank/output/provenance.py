"""What a report needs to be reproduced: the versions that produced it and digests of the files it read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from onnx_lowrank.graph.io import external_data_files


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import scipy

    from onnx_lowrank import __version__
    from onnx_lowrank.runtime.sessions import onnxruntime_builds

    return {"onnx-lowrank": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_builds": ", ".join(f"{name} {version}" for name, version in onnxruntime_builds().items()),
            "numpy": numpy.__version__, "scipy": scipy.__version__}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_input(model) -> dict | None:
    """Path and SHA-256 of the input model file and of its external-data files (None for an in-memory model)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = Path(model)
    return {"path": str(path), "sha256": sha256_of(path),
            "external_data": {str(f): sha256_of(f) for f in external_data_files(path) if f.is_file()}}
