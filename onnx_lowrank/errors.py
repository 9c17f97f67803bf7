"""One exception tree: everything the tool raises on bad input derives from LowRankError.

Messages say what was given, what was expected and, where one helps, a hint; the CLI prints
them on one line and exits non-zero.
"""

from __future__ import annotations


class LowRankError(Exception):
    """Base of every error onnx-lowrank raises deliberately."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)


class InvalidOptionError(LowRankError, ValueError):
    """An option or parameter is outside what the tool accepts."""


class ModelLoadError(LowRankError):
    """The input file is not a usable ONNX model."""


class NothingToDecomposeError(LowRankError):
    """The model has no convolution that can be decomposed."""


class InfeasibleTargetError(LowRankError):
    """The requested speedup cannot be reached with the decomposable layers."""


class CalibrationError(LowRankError):
    """The calibration data is missing, empty or does not fit the model."""


class OutputPathError(LowRankError):
    """The output path cannot be written safely."""
