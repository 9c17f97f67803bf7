"""The z-subproblem of Eq. 9: per element, ``min_z (t - r(z))^2 + lambda (z - p)^2``.

``t = r(y)`` is the target response, ``p = M yhat + b`` the current linear prediction. The paper
solves it in closed form for ReLU (Eq. 10-11); it is a 1-D problem for any ``r``:

* piecewise-linear ``r``: on each piece the cost is a convex quadratic, so its minimiser is the
  unconstrained one clipped to the piece; the best piece wins (exact);
* smooth ``r``: a few safeguarded Gauss-Newton steps from two starts. The previous ``z`` is kept
  as a candidate, so the step never increases the objective and the alternation stays monotone.
"""

from __future__ import annotations

import numpy as np

from onnx_lowrank.solvers.activations import (
    PIECEWISE_LINEAR,
    activation_derivative,
    apply_activation,
    linear_pieces,
    linear_tails,
    smooth_interval,
    validate_activation,
)

NEWTON_STEPS = 8


def z_update(kind: str, params: dict[str, float], target: np.ndarray, prediction: np.ndarray, lam: float,
             previous: np.ndarray | None = None) -> np.ndarray:
    validate_activation(kind)
    if kind == "relu":
        return relu_z_update(target, prediction, lam)
    if kind in PIECEWISE_LINEAR:
        return _piecewise_z(linear_pieces(kind, params), target, prediction, lam)
    return _smooth_z(kind, params, target, prediction, lam, previous)


def relu_z_update(target: np.ndarray, prediction: np.ndarray, lam: float) -> np.ndarray:
    """Eq. 10-11 in one comparison: the positive-branch optimum ``u = (t + lam p) / (1 + lam)``
    (cost ``lam (t - p)^2 / (1 + lam)``) beats ``z = min(0, p)`` exactly when
    ``p + (sqrt((1 + lam) / lam) - 1) t > 0``, for ``t >= 0``. Few passes over large arrays."""
    margin = target * (np.sqrt((1.0 + lam) / lam) - 1.0)
    margin += prediction
    positive = prediction * (lam / (1.0 + lam))
    positive += target * (1.0 / (1.0 + lam))
    return np.where(margin > 0, positive, prediction)


def _piecewise_z(pieces, target: np.ndarray, prediction: np.ndarray, lam: float) -> np.ndarray:
    candidates = []
    for piece in pieces:
        a = piece.slope
        z = np.clip((a * (target - piece.intercept) + lam * prediction) / (a * a + lam), piece.lower, piece.upper)
        candidates.append((z, (target - a * z - piece.intercept) ** 2 + lam * (z - prediction) ** 2))
    return _cheapest(candidates)


def _smooth_z(kind, params, target, prediction, lam, previous):
    def cost(z):
        return (target - apply_activation(kind, params, z)) ** 2 + lam * (z - prediction) ** 2

    candidates = [] if previous is None else [previous]
    tails = linear_tails(kind)
    if tails:  # Newton steps cannot cross HardSwish's kinks: its linear tails are solved exactly
        candidates.append(_piecewise_z(tails, target, prediction, lam))
    # Starts: the prediction itself, and the penalty-weighted blend of target and prediction,
    # which sits on the main (near-identity) branch of SiLU, GELU and HardSwish.
    low, high = smooth_interval(kind)
    for z in (prediction, (target + lam * prediction) / (1.0 + lam)):
        z = np.clip(z, low, high)
        for _ in range(NEWTON_STEPS):
            slope = activation_derivative(kind, params, z)
            residual = apply_activation(kind, params, z) - target
            # Gauss-Newton keeps the curvature positive, so every step is a descent direction.
            z = np.clip(z - (residual * slope + lam * (z - prediction)) / (slope * slope + lam), low, high)
        candidates.append(z)
    return _cheapest([(z, cost(z)) for z in candidates])


def _cheapest(candidates: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per element, the candidate z with the lowest cost (the first one on ties)."""
    best, best_cost = candidates[0]
    for z, cost in candidates[1:]:
        better = cost < best_cost
        best = np.where(better, z, best)
        best_cost = np.where(better, cost, best_cost)
    return best
