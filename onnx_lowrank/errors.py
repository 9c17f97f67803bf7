"""Two exception trees. ``LowRankError`` is bad input: what the user gave cannot be used (exit 2).
``InternalError`` is a bug of ours (exit 3) and deliberately not a ``LowRankError``, so that a
pipeline catching bad input never mistakes a bug for it.

Messages say what was given, what was expected and, where one helps, a hint; the CLI prints
them on one line.
"""

from __future__ import annotations


class LowRankError(Exception):
    """Base of every error onnx-lowrank raises on bad input."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)


class InvalidOptionError(LowRankError, ValueError):
    """An option or parameter has a value outside what the tool accepts."""


class InvalidTypeError(InvalidOptionError, TypeError):
    """An option or parameter has the wrong type."""


class ModelLoadError(LowRankError):
    """The input file is not a usable ONNX model."""


class ModelRunError(LowRankError):
    """onnxruntime cannot run the input model on the given data."""


class NothingToDecomposeError(LowRankError):
    """The model has no convolution that can be decomposed."""


class InfeasibleTargetError(LowRankError):
    """The requested speedup cannot be reached with the decomposable layers; ``reachable``, where
    known, is the most a plan can give by the measure that refused it."""

    def __init__(self, message: str, hint: str | None = None, reachable: float | None = None) -> None:
        super().__init__(message, hint)
        self.reachable = reachable


class BudgetNotMetError(LowRankError):
    """No decomposition meets the accuracy budget on the held-out data."""


class CalibrationError(LowRankError):
    """The calibration data is missing, empty or does not fit the model."""


class OutputPathError(LowRankError):
    """An output path cannot be written safely."""


class ProviderError(LowRankError):
    """An execution provider asked for is not installed or cannot start here."""


class QuantizationError(LowRankError):
    """onnxruntime's quantizer failed on the model."""


class InternalError(Exception):
    """Something the tool produced is wrong: a bug to report, not bad input."""
