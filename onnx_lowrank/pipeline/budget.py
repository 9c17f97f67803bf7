"""What the user may lose, as a budget a search meets: relative output error, top-1 agreement,
accuracy drop or a metric of their own, measured against the original's outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable

import numpy as np

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.measure.fidelity import compare_outputs
from onnx_lowrank.userfiles import load_from_file, names_file

Metric = Callable[[dict, dict, "np.ndarray | None"], float]


@dataclass(frozen=True)
class Budget:
    """What the user may lose: ``kind`` is ``error`` (relative output error, at most ``limit``),
    ``agreement`` (top-1 agreement with the original, at least), ``drop`` (accuracy points lost,
    at most; needs labels) or ``metric`` (a user function of (original outputs, candidate outputs,
    labels), higher is better, at least ``limit``)."""

    kind: str
    limit: float
    metric: Metric | None = None
    name: str = ""

    KINDS = ("error", "agreement", "drop", "metric")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidOptionError(f"unknown budget {self.kind!r}", hint=f"choose one of {', '.join(self.KINDS)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, Real) or not math.isfinite(self.limit):
            raise InvalidOptionError(f"the {self.kind} budget must be a finite number, got {self.limit!r}")
        object.__setattr__(self, "limit", float(self.limit))  # NumPy scalars too, and plain in the report
        if self.kind in ("error", "drop") and self.limit < 0:
            raise InvalidOptionError(f"the {self.kind} budget must be >= 0, got {self.limit}")
        if self.kind == "agreement" and not 0 <= self.limit <= 1:
            raise InvalidOptionError(f"--min-agreement is a fraction between 0 and 1, got {self.limit}")
        if self.kind == "metric" and not callable(self.metric):
            raise InvalidOptionError("a metric budget needs a callable metric(original, candidate, labels)")

    @classmethod
    def from_file(cls, text: str, limit: float) -> "Budget":
        """``--metric file.py:fn --min-metric limit``."""
        if not names_file(text):
            raise InvalidOptionError(f"--metric takes FILE.py:FUNCTION, got {text!r}",
                                     hint="name the function, e.g. --metric score.py:accuracy")
        return cls("metric", limit, load_from_file(text, InvalidOptionError, "metric"), name=text)

    @property
    def higher_is_better(self) -> bool:
        return self.kind in ("agreement", "metric")

    def describe(self) -> str:
        return {"error": f"relative output error <= {self.limit:g}", "agreement": f"top-1 agreement >= {self.limit:g}",
                "drop": f"accuracy drop <= {self.limit:g} points",
                "metric": f"{self.name or 'metric'} >= {self.limit:g}"}[self.kind]

    def value(self, reference: dict, outputs: dict, labels: np.ndarray | None) -> float:
        fidelity = compare_outputs(reference, outputs, labels)
        if self.kind == "error":
            return float(max(fidelity.output_rel_error.values()))  # every output, as the INT8 tolerance
        if self.kind == "agreement":
            if fidelity.top1_agreement is None:
                raise InvalidOptionError("--min-agreement needs a classifier (its first output as class scores)",
                                         hint="use --max-error, or --metric for other outputs")
            return fidelity.top1_agreement
        if self.kind == "drop":
            return 100 * (fidelity.accuracy_original - fidelity.accuracy_optimized)
        try:
            value = self.metric(reference, outputs, labels)
            value = float(value)
        except (Exception, SystemExit) as exc:  # the user's code: sys.exit() in it must not end the run as done
            raise InvalidOptionError(f"the metric {self.name or 'function'} failed: {type(exc).__name__}: {exc}",
                                     hint="it takes (original_outputs, candidate_outputs, labels) and returns a "
                                          "number") from None
        if not math.isfinite(value):
            raise InvalidOptionError(f"the metric {self.name or 'function'} returned {value}, not a finite number",
                                     hint="return a finite score, higher is better")
        return value

    def met(self, value: float) -> bool:
        return value >= self.limit if self.higher_is_better else value <= self.limit

    def loss(self, value: float) -> float | None:
        """What the budget limits, as a loss that is 0 for a perfect copy (None for a user metric,
        whose scale is unknown)."""
        return {"error": value, "drop": value, "agreement": 1 - value}.get(self.kind)
