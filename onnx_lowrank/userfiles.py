"""Code the user names as ``file.py:Name`` (a calibration reader, a metric), loaded with every failure
of the user's file, ``sys.exit()`` included, turned into the caller's one-line error."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable


def names_file(text: str) -> bool:
    """Whether ``text`` has the form ``something.py:Name``."""
    return ":" in text and text.rsplit(":", 1)[0].endswith(".py")


def load_from_file(text: str, error: Callable[[str], Exception], role: str) -> object:
    """The object ``Name`` defined by ``file.py`` in ``text`` (``file.py:Name``)."""
    file_name, attr = text.rsplit(":", 1)
    path = Path(file_name)
    if not path.is_file():
        raise error(f"{role} script not found: {path}")
    try:
        spec = importlib.util.spec_from_file_location(f"onnx_lowrank_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a user's script may even call sys.exit()
        raise error(f"could not load the {role} {text}: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise error(f"{path} defines no {attr!r}")
    return getattr(module, attr)
