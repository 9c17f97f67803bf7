"""The run's options, each declared once.

A field of :class:`Options` with its :func:`option` declaration is at once the library keyword of
``compress`` and ``compress_to_budget`` with its validation (as scikit-learn's parameter
constraints), the CLI flag with its help, choices and panel (``cli.app`` builds its command from
these declarations), the entry in the report's ``options``, and, for a path, what the run does to
the file (``userfiles.FileUse``), which the checks that protect the user's files read.

A wrong type or value raises an ``InvalidOptionError`` (``InvalidTypeError`` for a wrong type)
naming the parameter, never a ``TypeError`` from deep inside the pipeline.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Sequence

from onnx_lowrank.errors import InvalidOptionError, InvalidTypeError
from onnx_lowrank.registry import METHODS, Method, PlanFamily
from onnx_lowrank.userfiles import FileUse

RANK_SELECTIONS = ("energy", "sensitivity", "uniform")
PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino")
QUANTIZATIONS = ("int8",)
OBJECTIVES = ("flops", "latency")
INT8_CALIBRATIONS = ("minmax", "entropy", "percentile")
LAYER_KINDS = ("conv", "transpose", "dense")  # graph.units.Unit.kind: Conv (1-3-D), ConvTranspose, Gemm/MatMul
MAX_THREADS = 256  # onnxruntime starts every thread it is given; thousands take minutes and gain nothing
MIN_BENCH_ROUNDS = 15  # a median of fewer interleaved rounds moves with the machine's noise

# The CLI's help panels.
DATA, PLAN, BUDGET, DISTILL, QUANTIZE, RUN = ("Data", "Plan and method", "Accuracy budget (instead of --speedup)",
                                              "Distillation (paper 3.6)", "INT8 on top", "Measurement and output")
DEVICES = ("cpu", "cuda")


class Check:
    """A parameter constraint: validates a library value, and says how the CLI takes it."""

    cli_type: type = str  # what the CLI parses one value of the flag as
    multiple = False  # the flag repeats (and a value may be comma-separated for choices)
    choices: tuple[str, ...] | None = None
    use: FileUse | None = None  # a path: what the run does to the file

    def __call__(self, name: str, value: Any) -> Any:
        raise NotImplementedError

    def from_cli(self, value: Any) -> Any:
        return value


class Integer(Check):
    cli_type = int

    def __init__(self, minimum: int, maximum: int | None = None, why: str | None = None) -> None:
        self.minimum, self.maximum, self.why = minimum, maximum, why

    def __call__(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise InvalidTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if value < self.minimum:
            raise InvalidOptionError(f"{name} must be at least {self.minimum}, got {value}", hint=self.why)
        if self.maximum is not None and value > self.maximum:
            raise InvalidOptionError(f"{name} must be at most {self.maximum}, got {value}", hint=self.why)
        return int(value)


class NumberAbove(Check):
    cli_type = float

    def __init__(self, minimum: float, hint: str) -> None:
        self.minimum, self.hint = minimum, hint

    def __call__(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(value) and value > self.minimum):
            raise InvalidOptionError(f"{name} must be a finite number greater than {self.minimum:g}, got {value!r}",
                                     hint=self.hint)
        return float(value)


class Flag(Check):
    cli_type = bool

    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
        return value


class Choice(Check):
    def __init__(self, allowed: Sequence[str]) -> None:
        self.choices = tuple(allowed)

    def __call__(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidTypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        if value not in self.choices:
            raise InvalidOptionError(f"unknown {name.replace('_', ' ')} {value!r}",
                                     hint=f"choose one of {', '.join(self.choices)}")
        return value


class Names(Check):
    """A name or a sequence of names; a single string is one name, not its characters."""

    multiple = True

    def __call__(self, name: str, value: Any) -> tuple[str, ...]:
        values = (value,) if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise InvalidTypeError(f"{name} must be a string or a sequence of strings, got {value!r}")
        return tuple(values)


class Choices(Names):
    """Names from a fixed set; on the command line repeated or comma-separated."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.single = Choice(allowed)
        self.choices = self.single.choices

    def __call__(self, name: str, value: Any) -> tuple[str, ...]:
        return tuple(self.single(name.rstrip("s"), v) for v in super().__call__(name, value))

    def from_cli(self, value: Sequence[str]) -> list[str]:
        return [part for text in value for part in text.split(",") if part]


class PathText(Check):
    cli_type = Path

    def __init__(self, use: FileUse) -> None:
        self.use = use

    def __call__(self, name: str, value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)):
            raise InvalidTypeError(f"{name} must be a path, got {type(value).__name__} {value!r}")
        return os.fspath(value)


class Size(Check):
    """(height, width); on the command line ``HxW``."""

    def __call__(self, name: str, value: Any) -> tuple[int, int]:
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
            raise InvalidTypeError(f"{name} must be (height, width), got {value!r}")
        return tuple(Integer(1)(name, v) for v in value)  # type: ignore[return-value]

    def from_cli(self, value: str) -> tuple[int, int]:
        try:
            height, width = (int(part) for part in value.lower().split("x"))
        except ValueError:
            raise InvalidOptionError(f"--input-size takes HxW, e.g. 224x224, got {value!r}") from None
        return height, width


class OrNone(Check):
    """``None`` or what ``check`` accepts."""

    def __init__(self, check: Check) -> None:
        self.check = check
        self.cli_type, self.multiple, self.choices, self.use = check.cli_type, check.multiple, check.choices, check.use

    def __call__(self, name: str, value: Any) -> Any:
        return None if value is None else self.check(name, value)

    def from_cli(self, value: Any) -> Any:
        return self.check.from_cli(value)


@dataclass(frozen=True)
class Declared:
    """One option's declaration beyond its default: the check, and the CLI flag's presentation."""

    check: Check
    help: str
    panel: str
    flag: str | None = None  # where not --the-name-dashed (a bool's default True gives --x/--no-x)
    metavar: str | None = None
    default_depends: bool = False  # the CLI passes it only when given: its default depends on other options


def option(default: Any, check: Check, help: str, panel: str, **presentation: Any) -> Any:
    return field(default=default, metadata={"declared": Declared(check, help, panel, **presentation)})


def declaration(option_field) -> Declared:
    return option_field.metadata["declared"]


FORMS = "an image folder, a .npy file, an .npz keyed by input name (optional 'labels'), or file.py:ReaderName"
_SPEEDUP = NumberAbove(1.0, "e.g. a speedup of 2 halves the conv FLOPs")


@dataclass(frozen=True)
class Options:
    speedup: float = option(4.0, _SPEEDUP, "Target theoretical speedup of the decomposed layers (> 1; default 4), "
                            "or, with a budget, where the search starts (default 2).", PLAN,
                            default_depends=True)
    method: str = option("asymmetric", Choice(tuple(METHODS)), "asymmetric (default: nonlinear + Eq. 12), asym3d "
                         "(also split k x k into k x 1 and 1 x k, paper 3.5), nonlinear, linear; data-free "
                         "baselines: jaderberg, svd, tucker2.", PLAN)
    symmetric: bool = option(False, Flag(), "Ablation: solve every layer from the original network's inputs, not "
                             "the approximated ones.", PLAN)
    rank_selection: str | None = option(None, OrNone(Choice(RANK_SELECTIONS)), "energy (Eq. 13-14; default for "
                                        "the data-driven methods), sensitivity (measured end-to-end loss per layer "
                                        "and rank, data-driven methods: 1.1-1.5x a run's time on small models, 5-6x on "
                                        "deep high-resolution ones (VGG-16 224, CRAFT); up to 21 percent less error than "
                                        "energy for the channel methods on most of them, worse for asym3d) "
                                        "or uniform (default for the baselines).",
                                        PLAN)
    channel_speedup: float | None = option(None, OrNone(_SPEEDUP), "asym3d: the channel part's speedup "
                                           "(default sqrt of --speedup, more where the split cannot make up the "
                                           "rest); the spatial split does the rest.", PLAN)
    channel_only: tuple[str, ...] = option((), Names(), "asym3d: conv to decompose by channels only, without the "
                                           "k x 1 / 1 x k split (repeat, as --skip).", PLAN)
    rank_multiple: int = option(16, Integer(1), "Round ranks to this multiple (1 disables).", PLAN)
    num_images: int = option(300, Integer(1), "Calibration samples to use (capped at what there is).", DATA)
    holdout: int = option(100, Integer(1), "Calibration samples held out to measure fidelity on, when there is "
                          "no --eval (at most a fifth of the data; drawn by picture for an image folder).", DATA)
    samples_per_image: int | None = option(None, OrNone(Integer(1)), "Spatial positions sampled per image, the "
                                           "same for every layer (default: sized per layer, at least 40 samples "
                                           "per channel where the data allows).", DATA)
    sample_memory_mb: int = option(2048, Integer(1), "Bound on the memory of all sampled responses; half of it "
                                   "bounds the feature maps an asymmetric solve carries from layer to layer.", DATA,
                                   flag="--sample-memory", metavar="MB")
    seed: int = option(0, Integer(0), "Seed for sampling and random inputs.", DATA)
    skip: tuple[str, ...] = option((), Names(), "Layer (node) name to leave alone (repeat; a value naming no layer "
                                   "is read as comma-separated names).", PLAN)
    ops: tuple[str, ...] = option(LAYER_KINDS, Choices(LAYER_KINDS), "Kinds of layer to decompose (repeat, or "
                                  "comma-separate): conv (1-, 2-, 3-D Conv), transpose (ConvTranspose), dense "
                                  "(Gemm, MatMul by a constant). --speedup counts their compute.", PLAN)
    providers: tuple[str, ...] = option(("cpu",), Choices(PROVIDERS), "Provider to benchmark (repeat, or "
                                        "comma-separate).", RUN)
    threads: int = option(0, Integer(0, MAX_THREADS), "onnxruntime intra-op threads (0 = its default).", RUN)
    bench: bool = option(True, Flag(), "Measure latency original vs optimized.", RUN)
    bench_rounds: int = option(30, Integer(MIN_BENCH_ROUNDS, why="a median of fewer rounds is the machine's noise"),
                               "Interleaved rounds the latency medians are taken over.", RUN)
    batch_size: int = option(8, Integer(1), "Batch size responses and fidelity are computed at (a model with a "
                             "fixed batch takes its own); the collections take fewer images a batch where their "
                             "layers' full-resolution outputs would take more than an eighth of --sample-memory.",
                             DATA)
    dry_run: bool = option(False, Flag(), "Analyse and print the plan; write no model.", RUN)
    input_size: tuple[int, int] | None = option(None, OrNone(Size()), "HxW to calibrate at when the model's is "
                                                "dynamic.", DATA)
    augment: int = option(0, Integer(0, 16), "Image folders: calibrate on this many views of each calibration "
                          "picture (itself, mirrored, random 80-100 % crops; 0 = off).", DATA, metavar="VIEWS")
    objective: str = option("flops", Choice(OBJECTIVES), "What --speedup counts: conv FLOPs, or conv latency "
                            "measured on the first --providers entry installed here (each layer's candidate forms "
                            "timed alone at --bench-batch; channel methods).", PLAN)
    latency_cache: str | None = option(None, OrNone(PathText(FileUse.CACHE)), "--objective latency: keep the "
                                       "layer timings in this JSON file, so the next run on this machine reuses "
                                       "them (written when the run succeeds).", PLAN)
    bench_batch: int = option(1, Integer(1), "Batch size latency is measured at (and planned at, with --objective "
                              "latency).", RUN)
    distill: bool = option(False, Flag(), "Then train the low-rank model toward the original on the calibration "
                           "data, no labels (its outputs and each decomposed layer's output); kept only if it "
                           "measures better on held-out data. Needs pip install 'onnx-lowrank\\[distill]'.", DISTILL)
    distill_time: float = option(600.0, NumberAbove(0.0, "e.g. 600: ten minutes"), "Wall-clock budget of --distill "
                                 "in seconds (it also stops when the validation loss stops improving).", DISTILL,
                                 metavar="SECONDS")
    distill_steps: int | None = option(None, OrNone(Integer(1)), "Most training steps of --distill (default: the "
                                       "time budget and early stopping decide).", DISTILL)
    distill_all_weights: bool = option(False, Flag(), "--distill trains every float weight, not only the factors "
                                       "and their biases.", DISTILL)
    distill_device: str = option("cpu", Choice(DEVICES), "Where --distill trains (cuda: a GPU torch sees).", DISTILL)
    quantize: str | None = option(None, OrNone(Choice(QUANTIZATIONS)), "int8: then quantize the low-rank model "
                                  "with onnxruntime's static quantizer (QDQ, per-channel weights, the calibration "
                                  "data), nodes that cost more than --int8-tolerance kept in float; the report "
                                  "compares original, low-rank, low-rank + int8 and int8 alone.", QUANTIZE)
    int8_calibration: str = option("minmax", Choice(INT8_CALIBRATIONS), "How INT8 activation ranges are "
                                   "calibrated.", QUANTIZE)
    int8_tolerance: float = option(0.05, NumberAbove(0.0, "e.g. 0.05: INT8 may add 0.05 to the relative output "
                                                          "error"),
                                   "What INT8 may add to the relative output error on held-out data; nodes that "
                                   "cost more are kept in float, and if none can be, the float model is written. "
                                   "With an accuracy budget, the budget decides.", QUANTIZE)

    def __post_init__(self) -> None:
        for option_field in fields(self):
            value = getattr(self, option_field.name)
            object.__setattr__(self, option_field.name, declaration(option_field).check(option_field.name, value))
        self._check_combinations()

    @classmethod
    def from_keywords(cls, **keywords: Any) -> "Options":
        """The options of a library call: an unknown keyword is refused with the closest name."""
        known = {f.name for f in fields(cls)}
        for name in keywords:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise InvalidTypeError(f"unknown option {name!r}",
                                       hint=f"did you mean {close[0]!r}?" if close else "see onnx_lowrank.Options")
        return cls(**keywords)

    def _check_combinations(self) -> None:
        spec = self.spec
        if self.rank_selection is not None and self.rank_selection not in spec.selections:
            if self.rank_selection == "sensitivity":
                data_driven = [name for name, m in METHODS.items() if "sensitivity" in m.selections]
                raise InvalidOptionError(f"sensitivity rank selection is built for the data-driven methods "
                                         f"({', '.join(data_driven)}), not --method {self.method}",
                                         hint="use --rank-selection energy with this method")
            raise InvalidOptionError(f"--method {self.method} plans {spec.plan.value} ranks; only "
                                     f"{' or '.join(spec.selections)} rank selection is built for it",
                                     hint=f"drop the {self.rank_selection} rank selection for --method {self.method}")
        if self.objective == "latency" and (not spec.latency or self.selection != "energy"):
            timed = [name for name, m in METHODS.items() if m.latency]
            raise InvalidOptionError(f"--objective latency plans channel and 3d decompositions by energy; not --method "
                                     f"{self.method} with {self.selection} ranks",
                                     hint=f"use --method {' or '.join(timed)} with energy rank selection")
        if self.symmetric and not spec.asymmetric:
            raise InvalidOptionError(f"--symmetric changes the asymmetric methods; --method {self.method} "
                                     "is not one", hint="drop --symmetric, or use --method asymmetric or asym3d")
        if self.latency_cache is not None and self.objective != "latency":
            raise InvalidOptionError("--latency-cache keeps the layer timings of --objective latency",
                                     hint="add --objective latency, or drop --latency-cache")
        if self.objective == "latency" and self.channel_speedup is not None:
            raise InvalidOptionError("--objective latency chooses each layer's channel and 3d parts on measured "
                                     "time; --channel-speedup fixes them by FLOPs", hint="drop --channel-speedup")
        if spec.plan is not PlanFamily.THREE_D and (self.channel_speedup is not None or self.channel_only):
            raise InvalidOptionError(f"--channel-speedup and --channel-only shape the 3d decomposition, not "
                                     f"--method {self.method}", hint="use them with --method asym3d")

    @property
    def spec(self) -> Method:
        """The method's declaration (``registry.METHODS``)."""
        return METHODS[self.method]

    @property
    def data_free(self) -> bool:
        return self.spec.data_free

    @property
    def asymmetric(self) -> bool:
        return self.spec.asymmetric and not self.symmetric

    @property
    def selection(self) -> str:
        return self.rank_selection or self.spec.default_selection

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def takes_options(function: Callable) -> Callable:
    """Give ``function(..., **options)`` the options as keyword-only parameters in its signature, for
    ``help()``, IDEs and ``inspect``: the declarations stay the only list of them."""
    signature = inspect.signature(function)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    named = {p.name for p in own}
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
             for f in fields(Options) if f.name not in named]
    function.__signature__ = signature.replace(parameters=own + extra)
    return function
