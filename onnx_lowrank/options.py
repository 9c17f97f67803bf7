"""The pipeline's options, validated in one declarative place (as scikit-learn's parameter constraints).

Every public entry builds an :class:`Options`; a wrong type or value raises an
``InvalidOptionError`` (an ``InvalidTypeError`` for a wrong type) naming the parameter, never a
``TypeError`` from deep inside the pipeline.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any, Callable, Sequence

from onnx_lowrank.errors import InvalidOptionError, InvalidTypeError
from onnx_lowrank.registry import METHODS, Method, PlanFamily

RANK_SELECTIONS = ("energy", "sensitivity", "uniform")
PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino")
QUANTIZATIONS = ("int8",)
OBJECTIVES = ("flops", "latency")
INT8_CALIBRATIONS = ("minmax", "entropy", "percentile")
LAYER_KINDS = ("conv", "transpose", "dense")  # graph.units.Unit.kind: Conv (1-3-D), ConvTranspose, Gemm/MatMul
MAX_THREADS = 256  # onnxruntime starts every thread it is given; thousands take minutes and gain nothing


@dataclass(frozen=True)
class Options:
    speedup: float = 4.0
    method: str = "asymmetric"
    symmetric: bool = False
    rank_selection: str | None = None  # None: energy for the data-driven methods, uniform for the baselines
    channel_speedup: float | None = None  # asym3d: None = sqrt(speedup)
    channel_only: tuple[str, ...] = ()
    rank_multiple: int = 16
    num_images: int = 300
    holdout: int = 100
    samples_per_image: int | None = None  # None: sized per layer (onnx_lowrank.planning.sampling)
    sample_memory_mb: int = 2048  # bound on the memory of all sampled responses
    seed: int = 0
    skip: tuple[str, ...] = ()
    ops: tuple[str, ...] = LAYER_KINDS  # which kinds of layer are decomposed
    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0
    bench: bool = True
    bench_rounds: int = 30
    batch_size: int = 8
    dry_run: bool = False
    input_size: tuple[int, int] | None = None
    augment: int = 0  # views per calibration picture of an image folder (0: none)
    objective: str = "flops"  # what --speedup counts: conv MACs, or conv latency measured on the provider
    latency_cache: str | None = None  # JSON file keeping measured layer latencies between runs
    bench_batch: int = 1  # batch the latency is measured (and, for --objective latency, planned) at
    quantize: str | None = None  # "int8": onnxruntime's static quantizer on the low-rank model
    int8_calibration: str = "minmax"
    int8_tolerance: float = 0.05  # what INT8 may add to the relative output error (quantize.stages)

    def __post_init__(self) -> None:
        for option in fields(self):
            value = getattr(self, option.name)
            object.__setattr__(self, option.name, _CONSTRAINTS[option.name](option.name, value))
        self._check_combinations()

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
        return {option.name: _plain(getattr(self, option.name)) for option in fields(self)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise InvalidTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise InvalidOptionError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise InvalidOptionError(f"{name} must be at most {maximum}, got {value}")
        return int(value)
    return check


def _number_above(minimum: float, hint: str) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(value) and value > minimum):
            raise InvalidOptionError(f"{name} must be a finite number greater than {minimum:g}, got {value!r}",
                                     hint=hint)
        return float(value)
    return check


_SPEEDUP = _number_above(1.0, "e.g. a speedup of 2 halves the conv FLOPs")


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _choice(allowed: Sequence[str]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidTypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        if value not in allowed:
            raise InvalidOptionError(f"unknown {name.replace('_', ' ')} {value!r}",
                                     hint=f"choose one of {', '.join(allowed)}")
        return value
    return check


def _strings(name: str, value: Any) -> tuple[str, ...]:
    """A name or a sequence of names; a single string is one name, not its characters."""
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise InvalidTypeError(f"{name} must be a string or a sequence of strings, got {value!r}")
    return tuple(values)


def _choices(allowed: Sequence[str]) -> Callable[[str, Any], tuple[str, ...]]:
    single = _choice(allowed)
    return lambda name, value: tuple(single(name.rstrip("s"), v) for v in _strings(name, value))


def _path_text(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidTypeError(f"{name} must be a path, got {type(value).__name__} {value!r}")
    return os.fspath(value)


def _size(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise InvalidTypeError(f"{name} must be (height, width), got {value!r}")
    return tuple(_integer(1)(name, v) for v in value)  # type: ignore[return-value]


_CONSTRAINTS: dict[str, Callable[[str, Any], Any]] = {
    "speedup": _SPEEDUP,
    "method": _choice(tuple(METHODS)),
    "symmetric": _flag,
    "rank_selection": _optional(_choice(RANK_SELECTIONS)),
    "channel_speedup": _optional(_SPEEDUP),
    "channel_only": _strings,
    "rank_multiple": _integer(1),
    "num_images": _integer(1),
    "holdout": _integer(1),
    "samples_per_image": _optional(_integer(1)),
    "sample_memory_mb": _integer(1),
    "seed": _integer(0),
    "skip": _strings,
    "ops": _choices(LAYER_KINDS),
    "providers": _choices(PROVIDERS),
    "threads": _integer(0, MAX_THREADS),
    "bench": _flag,
    "bench_rounds": _integer(1),
    "batch_size": _integer(1),
    "dry_run": _flag,
    "input_size": _optional(_size),
    "augment": _integer(0, 16),
    "objective": _choice(OBJECTIVES),
    "latency_cache": _optional(_path_text),
    "bench_batch": _integer(1),
    "quantize": _optional(_choice(QUANTIZATIONS)),
    "int8_calibration": _choice(INT8_CALIBRATIONS),
    "int8_tolerance": _number_above(0.0, "e.g. 0.05: INT8 may add 0.05 to the relative output error"),
}
