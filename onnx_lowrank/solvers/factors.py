"""Data types shared by the solvers."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from onnx_lowrank.errors import InvalidOptionError


@dataclass(frozen=True)
class LowRankFactors:
    """``M = P @ Q.T`` of rank ``rank`` and the new bias ``b``: ``y_hat = M @ y + b``."""

    P: np.ndarray  # (d, rank)
    Q: np.ndarray  # (d, rank)
    bias: np.ndarray  # (d,)

    @property
    def rank(self) -> int:
        return self.P.shape[1]

    def apply(self, responses: np.ndarray) -> np.ndarray:
        """Approximated responses for ``responses`` of shape (n, d)."""
        return (responses @ self.Q) @ self.P.T + self.bias


@dataclass(frozen=True)
class ResponseStats:
    """Mean and scatter matrix of sampled responses, computed once in float64.

    ``scatter = Yc.T @ Yc`` with ``Yc`` the centred (n, d) responses (the paper's ``Y Y^T``),
    ``eigenvalues`` its spectrum in descending order (the PCA energy of Eq. 13) and
    ``eigenvectors`` its eigenvectors in that order: the first ``leading`` columns, completed to a
    basis only when read (a wide dense layer's d x d basis costs a second per layer, and the
    nonlinear solver never reads it).
    """

    mean: np.ndarray
    scatter: np.ndarray
    eigenvalues: np.ndarray
    leading: np.ndarray
    count: int

    @functools.cached_property
    def eigenvectors(self) -> np.ndarray:
        if self.leading.shape[1] == self.dim:
            return self.leading
        basis = np.linalg.qr(self.leading, mode="complete")[0]  # its first columns span the leading ones
        basis[:, :self.leading.shape[1]] = self.leading
        return deterministic_signs(basis)

    @classmethod
    def from_responses(cls, responses: np.ndarray) -> "ResponseStats":
        y = validate_responses(responses)
        mean = y.mean(axis=0, dtype=np.float64)
        centred = y - mean.astype(y.dtype)
        scatter = centred.T.astype(np.float64) @ centred.astype(np.float64)
        if len(y) < y.shape[1]:
            return cls._from_few_samples(mean, centred, scatter)
        return cls.from_scatter(mean, scatter, len(y))

    @classmethod
    def _from_few_samples(cls, mean: np.ndarray, centred: np.ndarray, scatter: np.ndarray) -> "ResponseStats":
        """Fewer samples than channels (a wide dense layer: one sample per image): the spectrum
        from the samples' thin SVD (n^2 d, where the scatter's eigendecomposition costs d^3: 6 s
        for 4096 channels on 2 cores); the directions beyond the samples' span, of zero variance,
        are an orthonormal completion, as any eigendecomposition's would be."""
        _, singular, right = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        eigenvalues = np.zeros(centred.shape[1])
        eigenvalues[:len(singular)] = singular ** 2
        return cls(mean, scatter, eigenvalues, deterministic_signs(right.T), len(centred))

    @classmethod
    def from_scatter(cls, mean: np.ndarray, scatter: np.ndarray, count: int) -> "ResponseStats":
        eigenvalues, eigenvectors = np.linalg.eigh(scatter)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.clip(eigenvalues[order], 0.0, None)
        return cls(mean, scatter, eigenvalues, deterministic_signs(eigenvectors[:, order]), count)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]



def spectrum_energy(spectrum: np.ndarray, rank: int) -> float:
    """Fraction of the variance kept by the top ``rank`` directions of a descending ``spectrum``."""
    total = float(np.sum(spectrum))
    return 1.0 if total == 0.0 else float(np.sum(spectrum[:rank]) / total)


def validate_responses(responses: np.ndarray) -> np.ndarray:
    y = np.asarray(responses)
    if y.ndim != 2:
        raise ValueError(f"responses must be a 2-D (samples, channels) array, got shape {y.shape}")
    if y.shape[0] < 2:
        raise ValueError(f"need at least 2 response samples, got {y.shape[0]}")
    if not np.all(np.isfinite(y)):
        raise InvalidOptionError("responses contain NaN or infinite values",
                                 hint="check the calibration data and the model's outputs")
    return y


def validate_rank(rank: int, dim: int) -> int:
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= dim:
        raise ValueError(f"rank must be an integer in [1, {dim}], got {rank!r}")
    return int(rank)


def deterministic_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip columns so that each one's largest-magnitude entry is positive (as sklearn's svd_flip)."""
    pivots = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def top_left_singular_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` top left singular vectors of ``matrix``, through the smaller Gram matrix (a
    1024 x 9216 unfolding takes a tenth of the time of its SVD), by SVD where the right Gram
    matrix is too ill-conditioned for the vectors to be recovered from it."""
    rows, columns = matrix.shape
    if rows < columns:  # the eigenvectors of A A^T are the left singular vectors themselves
        values, vectors = np.linalg.eigh(matrix @ matrix.T)
        return vectors[:, np.argsort(values)[::-1][:rank]]
    if rank <= columns:
        values, vectors = np.linalg.eigh(matrix.T @ matrix)
        top, top_vectors = values[:-rank - 1:-1], vectors[:, :-rank - 1:-1]
        if top[-1] > 1e-10 * max(float(top[0]), np.finfo(float).tiny):
            return (matrix @ top_vectors) / np.sqrt(top)
    # Fewer useful directions than the rank: the extra columns (zero singular values) are any
    # orthonormal completion, and their factor B^T U is zero. Only those columns are built: the
    # SVD's full basis is d x d (0.9 s for a 4096-wide dense layer, at every solver iteration).
    left = np.linalg.svd(matrix, full_matrices=False)[0]
    if rank <= left.shape[1]:
        return left[:, :rank]
    extra = np.random.default_rng(0).standard_normal((rows, rank - left.shape[1]))
    for _ in range(2):  # twice: once leaves rounding-level components along ``left``
        extra -= left @ (left.T @ extra)
    return np.hstack([left, np.linalg.qr(extra)[0]])
