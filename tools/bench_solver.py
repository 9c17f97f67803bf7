"""Time the nonlinear solver on one 512-filter layer with 50,000 sampled responses (issue target: <= 20 s
on 2 cores). Responses are synthetic: a decaying spectrum like a real conv layer's, a bias that
leaves about half of them negative, ReLU. Prints one Markdown table row per configuration.

    python tools/bench_solver.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnx_lowrank.solvers.nonlinear import fit_nonlinear, linear_fit


def responses(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = (0.97 ** np.arange(d)).astype(np.float32)
    mixing = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    return (rng.standard_normal((n, d)).astype(np.float32) * scales) @ mixing - 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 256])
    args = parser.parse_args()
    y = responses(args.samples, args.dim)
    target = np.maximum(y, 0)
    print("| d | n | rank d' | tol | iterations per stage | time (s) | linear error | nonlinear error |")
    print("|---|---|---|---|---|---|---|---|")
    for rank in args.ranks:
        linear = linear_fit(y, y, rank)
        linear_error = np.linalg.norm(target - np.maximum(linear.apply(y), 0)) / np.linalg.norm(target)
        for tol in (1e-4, 0.0):
            start = time.perf_counter()
            fit = fit_nonlinear(y, y, rank, tol=tol)
            elapsed = time.perf_counter() - start
            error = np.linalg.norm(target - np.maximum(fit.factors.apply(y), 0)) / np.linalg.norm(target)
            print(f"| {args.dim} | {args.samples} | {rank} | {tol:g} | {fit.iterations} | {elapsed:.1f} | "
                  f"{linear_error:.4f} | {error:.4f} |", flush=True)


if __name__ == "__main__":
    main()
