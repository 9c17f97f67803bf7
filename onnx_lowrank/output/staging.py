"""The files a run writes, and nothing else.

Every output path (the model, its external-data file, the report) is checked before any work:
none may be the input model or a file it references, nor another output of the same run, however
spelled (symlinks, hard links, ``a/../b``), and each must be creatable. At the end the files are
staged in a hidden folder beside their targets and renamed into place together, so a run leaves
all of its outputs or none of them, and never a temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import onnx

from onnx_lowrank.errors import OutputPathError
from onnx_lowrank.graph.io import external_data_files, write_model
from onnx_lowrank.output.provenance import sha256_of
from onnx_lowrank.userfiles import FileUse, mode_for_replacement, names_file


@dataclass(frozen=True)
class PathOption:
    """A path the user gave, by the flag that gave it, and what the run does to it."""

    flag: str
    path: str | os.PathLike
    use: FileUse


@dataclass(frozen=True)
class OutputPaths:
    model: Path | None  # None for a dry run
    data: Path | None  # the model's external-data file, written only for a model too large for one protobuf
    others: dict[str, Path] = field(default_factory=dict)  # by flag: the other files the run writes

    def get(self, flag: str) -> Path | None:
        return self.others.get(flag)


def check_outputs(input_model: str | os.PathLike | None, output_model: str | os.PathLike | None,
                  options: Sequence[PathOption] = ()) -> OutputPaths:
    """The run's output paths (no model for a dry run), or OutputPathError if any could harm a file
    or cannot be written. ``options`` are every path option the user gave, with its use: what is
    read (a data file or folder, a ``file.py:Name`` script) is an input as much as the model is,
    and nothing the run writes, appends to or replaces may be an input or another output."""
    model = Path(output_model) if output_model is not None else None
    if model is not None and model.suffix.lower() != ".onnx":
        raise OutputPathError(f"output path must end in .onnx, got {model}")
    data_file = model.with_name(model.name + ".data") if model is not None else None
    named = [(role, path) for role, path in (("OUT", model), ("OUT's external-data file", data_file))
             if path is not None]
    inputs, folders = [], []
    if input_model is not None and Path(input_model).is_file():
        inputs = [("the input model", Path(input_model))]
        inputs += [("an external-data file of the input model", f) for f in external_data_files(Path(input_model))]
    for option in options:
        text = os.fspath(option.path)
        if option.use is not FileUse.READ:
            named.append((option.flag, Path(text)))
            continue
        if names_file(text):
            text = text.rsplit(":", 1)[0]
        if os.path.isdir(text):
            folders.append(Path(text))
        else:
            inputs.append((f"the {option.flag} file", Path(text)))
    uses = {option.flag: option.use for option in options}
    for index, (role, path) in enumerate(named):
        _check_creatable(role, path, may_be_special=uses.get(role) is FileUse.APPENDED)
        for other_role, other in inputs + named[:index]:
            if _same_file(path, other):
                raise OutputPathError(f"{role} {path} is {other_role} ({other}); refusing to write over it",
                                      hint="choose another output path")
        for folder in folders:
            if path.exists() and Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents:
                raise OutputPathError(f"{role} {path} is a file of the data folder {folder}; refusing to write "
                                      "over it", hint="choose another output path")
    return OutputPaths(model, data_file, {role: path for role, path in named[2 if model else 0:]})


def _check_creatable(role: str, path: Path, may_be_special: bool) -> None:
    try:
        if path.is_dir():
            raise OutputPathError(f"{role} {path} is a directory", hint="give a file path")
        # Renaming over a device, pipe or socket would replace it with a file; what is appended to may be one.
        if not may_be_special and path.exists() and not path.is_file():
            raise OutputPathError(f"{role} {path} exists and is not a regular file", hint="give a file path")
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputPathError(f"cannot create {role} {path}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot create {role} {path}: {ancestor} is not writable",
                                  hint="choose a folder you can write to")
    except (ValueError, OSError) as exc:  # NUL bytes, names too long, loops of symlinks
        raise OutputPathError(f"invalid {role} path {str(path)!r}: {exc}") from None


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


class Staging:
    """Outputs written to temporary files beside their targets, renamed into place by ``commit``.
    Leaving the context without committing removes every file and folder it made."""

    def __init__(self, paths: OutputPaths) -> None:
        self.paths = paths
        self.sha256: dict[str, str] = {}
        self._moves: list[tuple[Path, Path]] = []
        self._folders: dict[Path, Path] = {}
        self._created: list[Path] = []
        self._stale: Path | None = None
        self._committed = False

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc_info) -> None:
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        if not self._committed:
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    pass

    def model(self, model: onnx.ModelProto) -> None:
        out = self.paths.model
        written = self._write(out, lambda tmp: write_model(model, tmp, self.paths.data.name))
        if self.paths.data not in written and self.paths.data in _referenced_files(out):
            self._stale = self.paths.data  # the previous OUT's data, which the new OUT does not use

    def describe_model(self) -> dict:
        """Path and SHA-256 of the staged model and of its external data, as the report gives them."""
        model, data = str(self.paths.model), str(self.paths.data)
        return {"path": model, "sha256": self.sha256[model],
                "external_data": {data: self.sha256[data]} if data in self.sha256 else {}}

    def text(self, path: Path, text: str) -> None:
        self.file(path, lambda tmp: tmp.write_text(text))

    def file(self, path: Path, write: Callable[[Path], object]) -> None:
        """Stage the file that ``write(temporary_path)`` makes, to become ``path``."""
        def staged(tmp: Path) -> list[Path]:
            write(tmp)
            return [tmp]
        self._write(path, staged)

    def _write(self, target: Path, write) -> list[Path]:
        try:
            folder = self._folder(target.parent)
            written = [Path(p) for p in write(folder / target.name)]
            for tmp in written:
                final = target.parent / tmp.name
                os.chmod(tmp, mode_for_replacement(final))
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                self.sha256[str(final)] = sha256_of(tmp)
                self._moves.append((tmp, final))
            return [target.parent / tmp.name for tmp in written]
        except OSError as exc:
            raise OutputPathError(f"could not write {target}: {exc.strerror or exc}") from None

    def _folder(self, parent: Path) -> Path:
        if parent not in self._folders:
            missing = []
            ancestor = parent
            while not ancestor.exists():
                missing.append(ancestor)
                ancestor = ancestor.parent
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self._folders[parent] = Path(tempfile.mkdtemp(prefix=".onnx-lowrank-", suffix=".tmp", dir=parent))
        return self._folders[parent]

    def commit(self) -> None:
        """Rename every staged file into place: data files first, so the model never names missing data."""
        try:
            for tmp, final in sorted(self._moves, key=lambda move: move[1] == self.paths.model):
                os.replace(tmp, final)
            if self._stale is not None:
                self._stale.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputPathError(f"could not write {exc.filename}: {exc.strerror or exc}") from None
        self._committed = True


def _referenced_files(model_path: Path) -> list[Path]:
    return external_data_files(model_path) if model_path.is_file() else []
