"""Elementwise nonlinearities ``r(.)`` that follow a conv, evaluated in NumPy.

Piecewise-linear ones (ReLU, Clip/ReLU6, LeakyReLU, HardSigmoid, identity) also describe their
pieces, which lets the z-step of the nonlinear solver minimise each piece in closed form; the
smooth ones give their derivative for a Newton-type 1-D solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.special

PIECEWISE_LINEAR = ("none", "relu", "clip", "leaky_relu", "hard_sigmoid")
SMOOTH = ("silu", "hard_swish", "gelu", "tanh", "sigmoid")
ACTIVATIONS = PIECEWISE_LINEAR + SMOOTH
_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


@dataclass(frozen=True)
class LinearPiece:
    """``r(z) = slope * z + intercept`` for ``lower <= z <= upper``."""

    lower: float
    upper: float
    slope: float
    intercept: float


def validate_activation(kind: str) -> str:
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}")
    return kind


def apply_activation(kind: str, params: dict[str, float], values: np.ndarray) -> np.ndarray:
    validate_activation(kind)
    if kind == "none":
        return values
    if kind == "relu":
        return np.maximum(values, 0)
    if kind == "clip":
        return np.clip(values, params.get("min", -np.inf), params.get("max", np.inf))
    if kind == "leaky_relu":
        return np.where(values >= 0, values, values * params.get("alpha", 0.01))
    if kind == "hard_sigmoid":
        return np.clip(values * params.get("alpha", 0.2) + params.get("beta", 0.5), 0.0, 1.0)
    if kind == "silu":
        return values * scipy.special.expit(values)
    if kind == "hard_swish":
        return values * np.clip(values + 3.0, 0.0, 6.0) / 6.0
    if kind == "gelu":
        if params.get("tanh_approximation"):
            return 0.5 * values * (1.0 + np.tanh(_SQRT_2_OVER_PI * (values + 0.044715 * values ** 3)))
        return 0.5 * values * (1.0 + scipy.special.erf(values / np.sqrt(2.0)))
    if kind == "tanh":
        return np.tanh(values)
    return scipy.special.expit(values)


def activation_derivative(kind: str, params: dict[str, float], values: np.ndarray) -> np.ndarray:
    """``r'(values)`` (one-sided at the kinks of the piecewise-linear ones)."""
    validate_activation(kind)
    if kind in PIECEWISE_LINEAR:
        out = np.zeros_like(values)
        for piece in linear_pieces(kind, params):
            out[(values >= piece.lower) & (values < piece.upper)] = piece.slope
        return out
    if kind == "silu":
        s = scipy.special.expit(values)
        return s * (1.0 + values * (1.0 - s))
    if kind == "hard_swish":
        return np.where(values < -3.0, 0.0, np.where(values > 3.0, 1.0, (2.0 * values + 3.0) / 6.0))
    if kind == "gelu":
        if params.get("tanh_approximation"):
            inner = _SQRT_2_OVER_PI * (values + 0.044715 * values ** 3)
            t = np.tanh(inner)
            return 0.5 * (1.0 + t) + 0.5 * values * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * values ** 2)
        return scipy.special.ndtr(values) + values * np.exp(-0.5 * values * values) / np.sqrt(2.0 * np.pi)
    if kind == "tanh":
        return 1.0 - np.tanh(values) ** 2
    s = scipy.special.expit(values)
    return s * (1.0 - s)


def linear_pieces(kind: str, params: dict[str, float]) -> tuple[LinearPiece, ...]:
    """The pieces of a piecewise-linear activation, covering the real line in order."""
    inf = np.inf
    if kind == "none":
        return (LinearPiece(-inf, inf, 1.0, 0.0),)
    if kind == "relu":
        return (LinearPiece(-inf, 0.0, 0.0, 0.0), LinearPiece(0.0, inf, 1.0, 0.0))
    if kind == "leaky_relu":
        return (LinearPiece(-inf, 0.0, float(params.get("alpha", 0.01)), 0.0), LinearPiece(0.0, inf, 1.0, 0.0))
    if kind == "clip":
        low, high = float(params.get("min", -inf)), float(params.get("max", inf))
        if not low <= high:
            raise ValueError(f"clip bounds must satisfy min <= max, got {low} and {high}")
        return (LinearPiece(-inf, low, 0.0, low), LinearPiece(low, high, 1.0, 0.0), LinearPiece(high, inf, 0.0, high))
    if kind == "hard_sigmoid":
        alpha, beta = float(params.get("alpha", 0.2)), float(params.get("beta", 0.5))
        if alpha <= 0:
            raise ValueError(f"hard_sigmoid needs alpha > 0, got {alpha}")
        low, high = -beta / alpha, (1.0 - beta) / alpha
        return (LinearPiece(-inf, low, 0.0, 0.0), LinearPiece(low, high, alpha, beta), LinearPiece(high, inf, 0.0, 1.0))
    raise ValueError(f"{kind!r} is not piecewise linear")


def smooth_interval(kind: str) -> tuple[float, float]:
    """Where a smooth-class activation is not linear (so a Newton step stays meaningful)."""
    return (-3.0, 3.0) if kind == "hard_swish" else (-np.inf, np.inf)


def linear_tails(kind: str) -> tuple[LinearPiece, ...]:
    """Where a smooth-class activation is exactly linear (HardSwish's flat left and identity right)."""
    if kind == "hard_swish":
        return (LinearPiece(-np.inf, -3.0, 0.0, 0.0), LinearPiece(3.0, np.inf, 1.0, 0.0))
    return ()


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """``||reference - approximation||_F / ||reference - mean(reference)||_F`` (0 is exact)."""
    ref = reference.astype(np.float64)
    spread = np.linalg.norm(ref - ref.mean(axis=0))
    error = np.linalg.norm(ref - approximation)
    return float(error / spread) if spread > 0 else float(error > 0)
