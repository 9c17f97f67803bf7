"""Elementwise nonlinearities ``r(.)`` that follow a conv, evaluated in NumPy."""

from __future__ import annotations

import numpy as np

from onnx_lowrank.errors import InvalidOptionError


def apply_activation(kind: str, params: dict[str, float], values: np.ndarray) -> np.ndarray:
    if kind == "none":
        return values
    if kind == "relu":
        return np.maximum(values, 0)
    if kind == "clip":
        return np.clip(values, params.get("min", -np.inf), params.get("max", np.inf))
    if kind == "leaky_relu":
        return np.where(values >= 0, values, values * params.get("alpha", 0.01))
    raise InvalidOptionError(f"unknown activation {kind!r}")


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """``||reference - approximation||_F / ||reference - mean(reference)||_F`` (0 is exact)."""
    ref = reference.astype(np.float64)
    spread = np.linalg.norm(ref - ref.mean(axis=0))
    error = np.linalg.norm(ref - approximation)
    return float(error / spread) if spread > 0 else float(error > 0)
