"""The user's files: what a run does to each path it is given (:class:`FileUse`, declared with
every path option), and the code a user names as ``file.py:Name`` (a calibration reader, a metric),
loaded with every failure of the user's file, ``sys.exit()`` included, turned into a one-line error."""

from __future__ import annotations

import enum
import importlib.util
import os
from pathlib import Path
from typing import Callable


class FileUse(enum.Enum):
    """What a run does to a path option's file; the file-safety checks (``output.staging``) read it."""

    READ = "read"  # an input: never written, never the target of an output (data, scripts, the model)
    WRITTEN = "written"  # staged and renamed into place with OUT, only when the run succeeds
    APPENDED = "appended"  # written as the run goes (the log); may be a pipe or a device
    CACHE = "cache"  # read, then replaced whole when the run succeeds; refused unless it is one of ours


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


def mode_for_replacement(path: Path) -> int:
    """A replaced file keeps its mode; a new one gets the umask's, as ``cp`` and ``onnx.save`` do."""
    if path.is_file():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
