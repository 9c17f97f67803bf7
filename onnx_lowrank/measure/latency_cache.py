"""Measured layer latencies kept between runs in the user's ``--latency-cache`` file.

The file is the user's: it is read only if it is one of ours (its ``format`` key, or the two keys
of the first format), refused with one line otherwise, and replaced whole, keeping its mode, only
when the run that measured succeeds (``save``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.userfiles import mode_for_replacement

CACHE_FORMAT = "onnx-lowrank latency cache"
CACHE_VERSION = 1


@dataclass
class LatencyCache:
    """Measured medians (ms) by key; read from and written back to ``path`` when one is given."""

    path: Path | None = None
    entries: dict[str, float] = field(default_factory=dict)
    hits: int = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> "LatencyCache":
        cache = cls(Path(path) if path is not None else None)
        if cache.path is not None and cache.path.exists():
            cache.entries = _read(cache.path)
        return cache

    def save(self) -> None:
        """Written whole and renamed into place, so a reader never sees half a file."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.chmod(temporary, mode_for_replacement(self.path))
            with os.fdopen(handle, "w") as stream:
                json.dump({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": self.entries}, stream,
                          indent=0, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _read(path: Path) -> dict[str, float]:
    """The entries of a cache of this version; none of a cache of ours of another version."""
    def refuse(why: str) -> InvalidOptionError:
        return InvalidOptionError(f"--latency-cache {path} is not a latency cache of onnx-lowrank: {why}",
                                  hint="give a new file name, or delete that file")

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise refuse(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    ours = isinstance(data, dict) and (data.get("format") == CACHE_FORMAT or set(data) == {"version", "entries"})
    if not ours:
        raise refuse(f"it has no \"format\": \"{CACHE_FORMAT}\" key")
    if data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise refuse("its entries are not a mapping")
    for key, value in entries.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise refuse(f"the timing of {key!r} is {value!r}, not a positive number of milliseconds")
    return {str(key): float(value) for key, value in entries.items()}
