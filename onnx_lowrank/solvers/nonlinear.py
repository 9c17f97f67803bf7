"""Nonlinear response reconstruction (paper Eq. 5-6, 9-11), symmetric or asymmetric (Eq. 12).

Minimises ``sum_i ||r(y_i) - r(M yhat_i + b)||^2`` over rank-``r`` ``M`` and ``b`` through the
relaxation of Eq. 6, alternating the reduced-rank regression step for ``(M, b)`` with the
closed-form per-element update of the auxiliary ``z``. ``y`` are the original network's
pre-activation responses, ``yhat`` the responses to the approximated input (``yhat = y`` in the
symmetric case).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.solvers.activations import apply_activation
from onnx_lowrank.solvers.factors import LowRankFactors, validate_rank, validate_responses
from onnx_lowrank.solvers.rrr import reduced_rank_regression

# The paper's schedule: warm up with a weak penalty, then tighten it.
PAPER_SCHEDULE = ((0.01, 25), (1.0, 25))


@dataclass
class NonlinearFit:
    factors: LowRankFactors
    objective: list[float] = field(default_factory=list)  # Eq. 6 after each iteration, per stage


def relu_z_update(target: np.ndarray, prediction: np.ndarray, lam: float) -> np.ndarray:
    """Closed form of Eq. 9 for ReLU: the better of ``z0 = min(0, y')`` and ``z1`` (Eq. 10-11).

    ``target`` is ``r(y)`` (non-negative), ``prediction`` is ``y' = M yhat + b``.
    """
    z0 = np.minimum(0.0, prediction)
    z1 = np.maximum(0.0, (lam * prediction + target) / (lam + 1.0))
    cost0 = target ** 2 + lam * (z0 - prediction) ** 2
    cost1 = (target - z1) ** 2 + lam * (z1 - prediction) ** 2
    return np.where(cost0 < cost1, z0, z1)


def linear_fit(y_hat: np.ndarray, y: np.ndarray, rank: int) -> LowRankFactors:
    """Asymmetric linear solution ``min ||(y - ybar) - M (yhat - yhatbar)||`` (PCA when ``yhat = y``)."""
    return _regress(y, *_centred_input(y_hat), rank)


def _centred_input(y_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred inputs, their mean and scatter ``Yc^T Yc``: computed once per layer."""
    mean_hat = y_hat.mean(axis=0, dtype=np.float64)
    centred_hat = (y_hat - mean_hat.astype(y_hat.dtype)).astype(np.float32)
    return centred_hat, mean_hat, _gram(centred_hat, centred_hat)


def _regress(target: np.ndarray, centred_hat: np.ndarray, mean_hat: np.ndarray, scatter: np.ndarray,
             rank: int) -> LowRankFactors:
    """Rank-``rank`` (M, b) minimising ``||target - (M yhat + b)||``: b from the means, M by RRR (Eq. 7-8)."""
    mean = target.mean(axis=0, dtype=np.float64)
    P, Q = reduced_rank_regression(scatter, _gram(target - mean.astype(target.dtype), centred_hat), rank)
    return LowRankFactors(P, Q, mean - P @ (Q.T @ mean_hat))


def fit_nonlinear(y_hat: np.ndarray, y: np.ndarray, rank: int, activation: str = "relu",
                  schedule: tuple[tuple[float, int], ...] = PAPER_SCHEDULE) -> NonlinearFit:
    """Alternating solver of Eq. 6 for ReLU, initialised from :func:`linear_fit`."""
    if activation != "relu":
        raise InvalidOptionError(f"the nonlinear solver handles relu, got {activation!r}")
    y_hat, y = validate_responses(y_hat), validate_responses(y)
    if y_hat.shape != y.shape:
        raise InvalidOptionError(f"yhat and y must have the same shape, got {y_hat.shape} and {y.shape}")
    rank = validate_rank(rank, y.shape[1])
    target = apply_activation("relu", {}, y).astype(np.float32)
    centred_hat, mean_hat, scatter = _centred_input(y_hat)
    factors = _regress(y, centred_hat, mean_hat, scatter, rank)
    fit = NonlinearFit(factors)
    for lam, iterations in schedule:
        for _ in range(iterations):
            prediction = factors.apply(y_hat).astype(np.float32)
            z = relu_z_update(target, prediction, lam)
            factors = _regress(z, centred_hat, mean_hat, scatter, rank)
            fit.objective.append(relaxed_objective(target, z, factors.apply(y_hat), lam))
    fit.factors = factors
    return fit


def relaxed_objective(target: np.ndarray, z: np.ndarray, prediction: np.ndarray, lam: float) -> float:
    """Eq. 6: ``sum ||r(y) - r(z)||^2 + lambda ||z - (M yhat + b)||^2``."""
    return float(np.sum((target - np.maximum(z, 0)) ** 2, dtype=np.float64)
                 + lam * np.sum((z - prediction) ** 2, dtype=np.float64))


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^T b`` in float32 arithmetic (fast BLAS) accumulated into a float64 result."""
    return (a.astype(np.float32, copy=False).T @ b.astype(np.float32, copy=False)).astype(np.float64)
