"""INT8 on top of the low-rank model, with onnxruntime's own static quantizer.

The recipe of onnxruntime's documentation: ``quant_pre_process`` (shape inference and graph
optimisation), then ``quantize_static`` in QDQ format with per-channel int8 weights, fed by the
run's calibration samples (never the held-out ones) through a ``CalibrationDataReader``. Layers
INT8 breaks are found with onnxruntime's QDQ debugging tools: an activation whose own
quantization noise (before vs after its QuantizeLinear/DequantizeLinear pair, on the calibration
samples) is too large is left in float, with the nodes on both sides of it, and the model is
quantized once more. Small factor layers of a decomposition with wide activation ranges are the
known case.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                     modify_model_output_intermediate_tensors)
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_lowrank.errors import LowRankError, ProviderError, QuantizationError
from onnx_lowrank.graph.io import first_line
from onnx_lowrank.evaluate import compare_outputs, interleaved_times, model_outputs
from onnx_lowrank.runtime import make_session, provider_available

log = logging.getLogger(__name__)

# int8 noise of a well-scaled activation is ~35-45 dB; an activation's own QDQ pair below this has
# a range so wide (a few outliers) that most of its values share a handful of levels.
FRAGILE_SQNR_DB = 20.0
DEBUG_SAMPLES = 64  # calibration samples the activations' noise is measured on, one run each
DEBUG_MEMORY = 1 << 30  # bound on the activations those runs keep


@dataclass
class Quantized:
    """The QDQ model, and the nodes left in float with the SQNR (dB) of the activation that sent them back."""

    model: onnx.ModelProto
    kept_float: dict[str, float] = field(default_factory=dict)


class SourceReader(CalibrationDataReader):
    """onnxruntime's ``CalibrationDataReader`` protocol over samples of a calibration source."""

    def __init__(self, source, indices: Sequence[int], batch_size: int) -> None:
        self._batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
        self._source, self._indices = source, list(indices)
        self.rewind()

    def one_by_one(self, limit: int) -> "SourceReader":
        """A reader of at most ``limit`` of these samples, spread over them, one per call."""
        step = max(1, len(self._indices) // limit)
        return SourceReader(self._source, self._indices[::step][:limit], 1)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._pending, None)
        return None if batch is None else self._source.get(batch)

    def rewind(self) -> None:
        self._pending = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def quantize_int8(model: onnx.ModelProto, reader: SourceReader, method: str = "minmax",
                  auto_exclude: bool = True, symmetric_activations: bool = False) -> Quantized:
    """Static INT8 (QDQ) of ``model``; with ``auto_exclude`` the activations INT8 breaks stay float.
    ``symmetric_activations``: int8 activations with zero point 0, as TensorRT requires; otherwise
    uint8 with a zero point, the form onnxruntime's CPU kernels are fastest with."""
    try:
        return _quantize_int8(model, reader, method, auto_exclude, symmetric_activations)
    except LowRankError:
        raise
    except Exception as exc:  # onnxruntime's tools raise anything; the user gets one line
        raise QuantizationError(f"onnxruntime's quantizer failed on the model: {first_line(exc)}",
                                hint="drop --quantize, or try another --int8-calibration") from None


def _quantize_int8(model: onnx.ModelProto, reader: SourceReader, method: str, auto_exclude: bool,
                   symmetric_activations: bool) -> Quantized:
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        onnx.save(model, Path(folder) / "float.onnx")
        _pre_process(Path(folder) / "float.onnx", prepared)
        quantized = Path(folder) / "int8.onnx"
        _quantize(prepared, quantized, reader, method, (), symmetric_activations)
        kept: dict[str, float] = {}
        if auto_exclude:
            kept = fragile_nodes(onnx.load(prepared), quantized, reader)
            if kept:
                log.info("INT8 keeps %d nodes in float: %s", len(kept), ", ".join(sorted(kept)))
                _quantize(prepared, quantized, reader, method, sorted(kept), symmetric_activations)
        return Quantized(onnx.load(quantized), kept)


def fragile_nodes(prepared: onnx.ModelProto, quantized: Path, reader: SourceReader) -> dict[str, float]:
    """Producer and consumers of every activation whose own QDQ noise is below ``FRAGILE_SQNR_DB``."""
    augmented = quantized.with_name("augmented.onnx")
    modify_model_output_intermediate_tensors(quantized, augmented)
    # Every activation of every sample is kept at once: as many samples as fit DEBUG_MEMORY.
    first = reader.one_by_one(1).get_next()
    per_sample = sum(a.nbytes for a in make_session(augmented, optimize=False).run(None, first)) if first else 1
    count = int(max(1, min(DEBUG_SAMPLES, DEBUG_MEMORY // max(per_sample, 1))))
    log.debug("INT8 noise measured on %d samples (%d bytes of activations each)", count, per_sample)
    matching = create_activation_matching(collect_activations(str(augmented), reader.one_by_one(count)))
    producers = {out: node.name for node in prepared.graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in prepared.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    fragile: dict[str, float] = {}
    for tensor, pair in matching.items():
        if "pre_qdq" not in pair or "post_qdq" not in pair:
            continue
        sqnr = typical_sqnr(pair["pre_qdq"], pair["post_qdq"])
        log.debug("INT8 SQNR of %s: %.1f dB", tensor, sqnr)
        if sqnr < FRAGILE_SQNR_DB:
            for node in [producers.get(tensor), *consumers.get(tensor, [])]:
                if node:
                    fragile[node] = min(sqnr, fragile.get(node, np.inf))
    return fragile


def typical_sqnr(before: Sequence[np.ndarray], after: Sequence[np.ndarray]) -> float:
    """The median over samples (one array each) of ``rounding_sqnr`` of a tensor before and after
    its QDQ pair: a range stretched by a few outlying samples hurts all the others, which a pooled
    figure, dominated by the outliers' own energy, would not show."""
    low, high = min(float(a.min()) for a in after), max(float(a.max()) for a in after)
    return float(np.median([rounding_sqnr(b, a, low, high) for b, a in zip(before, after)]))


def rounding_sqnr(before: np.ndarray, after: np.ndarray, low: float | None = None,
                  high: float | None = None) -> float:
    """Signal to rounding noise (dB) of one QDQ pair, whose range is [``low``, ``high``] (by
    default what ``after`` spans). The quantizer folds a ReLU/Clip that follows
    a conv into the pair's range, so the values before it are clipped to that range first: what is
    left is the error of the int8 grid itself (saturation by a percentile range is not counted)."""
    low = after.min() if low is None else low
    high = after.max() if high is None else high
    signal = np.clip(before.astype(np.float64), low, high)
    noise = np.linalg.norm(signal - after)
    return float("inf") if noise == 0 else float(20 * np.log10(max(np.linalg.norm(signal), 1e-30) / noise))


def _pre_process(source: Path, target: Path) -> None:
    quant_pre_process(str(source), str(target))


def _quantize(prepared: Path, target: Path, reader: SourceReader, method: str, exclude: Sequence[str],
              symmetric_activations: bool) -> None:
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    reader.rewind()
    printed = io.StringIO()  # onnxruntime's calibrators print progress to stdout: the run's tables go there
    with contextlib.redirect_stdout(printed):
        quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=list(exclude) or None,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric_activations})
    if printed.getvalue().strip():
        log.debug("onnxruntime's quantizer: %s", printed.getvalue().strip())


def int8_of(analysis, model: onnx.ModelProto, opts) -> Quantized:
    """``model`` quantized as the run asks, calibrated on the analysis' calibration samples."""
    data = analysis.data
    return quantize_int8(model, SourceReader(data.source, data.calib_indices, data.batch), opts.int8_calibration,
                         symmetric_activations=_symmetric_activations(opts))


def _symmetric_activations(opts) -> bool:
    return opts.providers[0] == "tensorrt"  # TensorRT takes symmetric int8 activations only


def add_int8(analysis, lowrank: onnx.ModelProto, report, opts, lowrank_int8: Quantized | None = None) -> onnx.ModelProto:
    """Quantize the low-rank model (the one written; ``lowrank_int8`` when that is done already)
    and, for comparison, the original; fidelity and latency of every stage a user weighs go to
    ``report.stages``. Returns low-rank + INT8."""
    data, run = analysis.data, analysis.run
    reference = analysis.reference
    symmetric = _symmetric_activations(opts)
    with run.stage("quantize", f"quantizing to INT8 ({opts.int8_calibration} calibration)"):
        if lowrank_int8 is None:
            lowrank_int8 = int8_of(analysis, lowrank, opts)
        original = onnx.load(reference) if isinstance(reference, (str, Path)) else reference
        original_int8 = int8_of(analysis, original, opts)
    for name, result in (("low-rank + int8", lowrank_int8), ("int8", original_int8)):
        if result.kept_float:
            run.warn(f"{name}: INT8 breaks {len(result.kept_float)} nodes (an activation's int8 noise above "
                     f"-{FRAGILE_SQNR_DB:.0f} dB), kept in float: {', '.join(sorted(result.kept_float))}")
    models = {"original": reference, "low-rank": lowrank, "low-rank + int8": lowrank_int8.model,
              "int8": original_int8.model}
    with run.stage("fidelity", "measuring the fidelity of the INT8 models"):
        labels = getattr(data.eval_source, "labels", None)
        labels = None if labels is None else labels[list(data.holdout_indices)]
        expected = model_outputs(reference, data.eval_source, data.holdout_indices, data.batch, opts.threads)
        stages = [{"stage": name, "fidelity": asdict(compare_outputs(expected, expected if name == "original" else
                                                                     model_outputs(model, data.eval_source,
                                                                                   data.holdout_indices, data.batch,
                                                                                   opts.threads), labels)),
                   "latency_ms": {}} for name, model in models.items()]
    if opts.bench:
        with run.stage("benchmark", "measuring the latency of every stage"):
            feeds = analysis.benchmark_feeds(opts.bench_batch)
            for provider in [p for p in opts.providers if provider_available(p)]:
                try:
                    times = interleaved_times(list(models.values()), feeds, provider=provider, threads=opts.threads,
                                              rounds=opts.bench_rounds)
                except ProviderError as exc:  # installed but cannot start: the main table says so too
                    log.info("INT8 stages not timed on %s: %s", provider, exc)
                    continue
                for stage, measured in zip(stages, times):
                    stage["latency_ms"][provider] = {"p50": float(np.median(measured)),
                                                     "p90": float(np.percentile(measured, 90))}
    report.stages = stages
    report.int8 = {"format": "QDQ, per-channel symmetric int8 weights, "
                             + ("symmetric int8 activations" if symmetric else "uint8 activations"),
                   "calibration": opts.int8_calibration, "kept_float": lowrank_int8.kept_float,
                   "kept_float_int8_alone": original_int8.kept_float}
    return lowrank_int8.model
