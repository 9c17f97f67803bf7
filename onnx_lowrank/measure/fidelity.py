"""What the user judges us on: fidelity to the original model and measured latency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from onnx_lowrank.errors import ProviderError
from onnx_lowrank.runtime.sessions import PROVIDER_NEEDS, make_session, provider_available, run_in_batches
from onnx_lowrank.runtime.split import DataSplit


@dataclass
class Fidelity:
    """Agreement of the optimized model with the original on held-out inputs."""

    output_rel_error: dict[str, float] = field(default_factory=dict)
    top1_agreement: float | None = None
    top5_overlap: float | None = None
    accuracy_original: float | None = None
    accuracy_optimized: float | None = None
    samples: int = 0


def looks_like_class_scores(array: np.ndarray) -> bool:
    """(N, K) scores, or (N, K, 1, 1) from a conv head, with at least two classes."""
    squeezed_tail = array.shape[2:] == () or all(d == 1 for d in array.shape[2:])
    return array.ndim >= 2 and array.shape[1] >= 2 and squeezed_tail


def model_outputs(model: onnx.ModelProto | Path, source, indices: Sequence[int], batch_size: int,
                  threads: int = 0, produced: bool = False) -> dict[str, np.ndarray]:
    """Every output of ``model`` on the samples ``indices``, by output name (rows in index order);
    ``produced``: a model this tool made (a failure is a bug, ``runtime.sessions.make_session``)."""
    session = make_session(model, threads=threads, produced=produced)
    names = [o.name for o in session.get_outputs()]
    parts: list[list[np.ndarray]] = []
    run_in_batches(session, source, indices, batch_size, lambda chunk, feeds, outputs: parts.append(outputs),
                   produced=produced)
    return {name: np.concatenate([batch[i] for batch in parts]) for i, name in enumerate(names)}


def held_out_outputs(model: onnx.ModelProto | Path, data: DataSplit, threads: int = 0,
                     produced: bool = False) -> dict[str, np.ndarray]:
    """Every output of ``model`` on the held-out samples (``model_outputs``)."""
    return model_outputs(model, data.eval_source, data.holdout_indices, data.batch, threads, produced)


def measure_fidelity(original: onnx.ModelProto | Path, optimized: onnx.ModelProto, data: DataSplit,
                     threads: int = 0) -> Fidelity:
    """``optimized`` against ``original`` on the held-out samples (accuracy too where they have labels)."""
    # One session at a time: the original's outputs are kept (they are small next to the weights of
    # a large model), then the optimized model runs on the same samples.
    reference = held_out_outputs(original, data, threads)
    return compare_outputs(reference, held_out_outputs(optimized, data, threads, produced=True),
                           data.held_out_labels())


def compare_outputs(reference: dict[str, np.ndarray], approx: dict[str, np.ndarray],
                    labels: np.ndarray | None = None) -> Fidelity:
    """Fidelity of ``approx`` to ``reference`` (outputs by name, as from ``model_outputs``);
    ``labels`` are the samples' class indices, for accuracy."""
    names = list(reference)
    fidelity = Fidelity(samples=len(next(iter(reference.values()))))
    for name in names:
        ref64, out64 = reference[name].astype(np.float64), approx[name].astype(np.float64)
        squared_norm, squared_error = float(np.sum(ref64 ** 2)), float(np.sum((ref64 - out64) ** 2))
        fidelity.output_rel_error[name] = (np.sqrt(squared_error / squared_norm) if squared_norm > 0
                                           else float(squared_error > 0))
    scores_ref, scores_out = reference[names[0]], approx[names[0]]
    if looks_like_class_scores(scores_ref):
        scores_ref = scores_ref.reshape(len(scores_ref), -1)
        scores_out = scores_out.reshape(len(scores_out), -1)
        fidelity.top1_agreement = float(np.mean(scores_ref.argmax(1) == scores_out.argmax(1)))
        if scores_ref.shape[1] >= 5:
            best_ref = np.argsort(-scores_ref, axis=1)[:, :5]
            best_out = np.argsort(-scores_out, axis=1)[:, :5]
            fidelity.top5_overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(best_ref, best_out)]))
        if labels is not None:
            fidelity.accuracy_original = float(np.mean(scores_ref.argmax(1) == labels))
            fidelity.accuracy_optimized = float(np.mean(scores_out.argmax(1) == labels))
    return fidelity


def interleaved_times(models: Sequence[onnx.ModelProto | Path], feeds: dict[str, np.ndarray], *,
                      provider: str = "cpu", threads: int = 0, rounds: int = 30, warmup: int = 5,
                      warm: bool = False, produced_from: int = 1) -> list[np.ndarray]:
    """Run times (ms) of each model, timed interleaved in this process after warm-up. Each round
    runs every model, rotating which goes first, so drifts in machine load hit all alike. ``warm``:
    each turn runs the model once untimed first, so it is timed with its input, weights and
    buffers in cache (as a layer inside a model, whose input was just written), not after the
    other models evicted them. ``models[produced_from:]`` are models this tool made."""
    sessions = [make_session(m, optimize=True, threads=threads, provider=provider, produced=i >= produced_from)
                for i, m in enumerate(models)]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for round_index in range(rounds):
        for offset in range(len(sessions)):
            which = (round_index + offset) % len(sessions)
            if warm:
                sessions[which].run(None, feeds)
            start = time.perf_counter()
            sessions[which].run(None, feeds)
            times[which].append((time.perf_counter() - start) * 1e3)
    return [np.asarray(t) for t in times]


def benchmark_providers(original, optimized, feeds: dict[str, np.ndarray], providers: Sequence[str], *,
                        threads: int = 0, rounds: int = 30,
                        advance=lambda step=1: None) -> tuple[dict[str, dict], dict[str, float | None]]:
    """Latency (p50, p90 in ms; throughput in samples/s) of both models on each provider, and the
    speedup of the medians; a provider that is not installed or cannot start is reported as such."""
    batch = len(next(iter(feeds.values())))
    latency: dict[str, dict] = {}
    speedup: dict[str, float | None] = {}
    for provider in providers:
        try:
            if not provider_available(provider):
                raise ProviderError(f"not available (needs {PROVIDER_NEEDS[provider]})")
            times = interleaved_times([original, optimized], feeds, provider=provider, threads=threads, rounds=rounds)
        except ProviderError as exc:
            latency[provider] = {"original": None, "optimized": None, "status": str(exc)}
            speedup[provider] = None
        else:
            medians = [float(np.median(t)) for t in times]
            latency[provider] = {"original": medians[0], "optimized": medians[1],
                                 "p90": {"original": float(np.percentile(times[0], 90)),
                                         "optimized": float(np.percentile(times[1], 90))},
                                 "throughput": {"original": 1e3 * batch / medians[0],
                                                "optimized": 1e3 * batch / medians[1]}, "batch": batch}
            speedup[provider] = medians[0] / medians[1]
        advance(1)
    return latency, speedup
