"""onnxruntime's own static quantizer, prepared and calibrated once per model.

The recipe of onnxruntime's documentation: ``quant_pre_process`` (shape inference and graph
optimisation), then ``quantize_static`` in QDQ format with per-channel symmetric int8 weights, fed
by the run's calibration samples (never the held-out ones) through a ``CalibrationDataReader``.
The accuracy guard quantizes the same model many times with different nodes left in float
(``nodes_to_exclude``); onnxruntime keeps the activation ranges of the first calibration in a
cache (``calibration_cache_path``, onnxruntime 1.32+), so the others cost a rewrite, not a
calibration. Older onnxruntime builds calibrate each time.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx.version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_lowrank.errors import LowRankError, QuantizationError
from onnx_lowrank.graph.io import first_line

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
_CACHES_RANGES = "calibration_cache_path" in inspect.signature(quantize_static).parameters
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class SourceReader(CalibrationDataReader):
    """onnxruntime's ``CalibrationDataReader`` protocol over samples of a calibration source, in
    batches of equal size (at most ``batch_size``, a divisor of the count): onnxruntime's histogram
    calibrators (entropy, percentile) stack the batches' outputs and fail on a shorter last one."""

    def __init__(self, source, indices: Sequence[int], batch_size: int) -> None:
        batch_size = max(d for d in range(1, max(1, min(batch_size, len(indices))) + 1) if len(indices) % d == 0)
        self._batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
        self._source = source
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._pending, None)
        return None if batch is None else self._source.get(batch)

    def rewind(self) -> None:
        self._pending = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class Int8Quantizer:
    """Static INT8 (QDQ) of one float model, any set of its nodes left in float. ``symmetric_activations``:
    int8 activations with zero point 0, as TensorRT requires; otherwise uint8 with a zero point, the
    form onnxruntime's CPU kernels are fastest with. Use as a context manager (its files are temporary)."""

    def __init__(self, model: onnx.ModelProto, reader: SourceReader, method: str = "minmax",
                 symmetric_activations: bool = False) -> None:
        self.reader, self.method, self.symmetric_activations = reader, method, symmetric_activations
        self._folder = tempfile.TemporaryDirectory(prefix="onnx-lowrank-int8-")
        folder = Path(self._folder.name)
        self._prepared, self._cache = folder / "prepared.onnx", folder / "calibration.json"
        with _one_error(), _working_folder(folder):
            onnx.save(_with_per_channel_opset(model), folder / "float.onnx")
            _pre_process(folder / "float.onnx", self._prepared)
        self.prepared = onnx.load(self._prepared)  # the float model onnxruntime quantizes: its node names

    def __enter__(self) -> "Int8Quantizer":
        return self

    def __exit__(self, *exc) -> None:
        self._folder.cleanup()

    def quantize(self, keep_float: Sequence[str] = (), only: Sequence[str] | None = None) -> onnx.ModelProto:
        """The QDQ model with the nodes ``keep_float`` (names in ``prepared``) left in float, or
        with only the nodes ``only`` quantized."""
        target = Path(self._folder.name) / "int8.onnx"
        self.reader.rewind()
        cached = {"calibration_cache_path": str(self._cache)} if _CACHES_RANGES else {}
        printed = io.StringIO()  # onnxruntime's calibrators print progress to stdout: the run's tables go there
        with _one_error(), contextlib.redirect_stdout(printed):
            quantize_static(str(self._prepared), str(target), self.reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QInt8 if self.symmetric_activations else QuantType.QUInt8,
                            calibrate_method=CALIBRATION_METHODS[self.method], nodes_to_exclude=list(keep_float) or None,
                            nodes_to_quantize=None if only is None else list(only),
                            extra_options={"WeightSymmetric": True,
                                           "ActivationSymmetric": self.symmetric_activations}, **cached)
        if printed.getvalue().strip():
            log.debug("onnxruntime's quantizer: %s", printed.getvalue().strip())
        return onnx.load(target)

    def with_float_constants(self, quantized: onnx.ModelProto, node: str) -> onnx.ModelProto:
        """``quantized`` with the constant operands of ``node`` (its weights, bias, a Mul's scale)
        back in float and its activations still int8: what the node's weight rounding alone costs."""
        source = next((n for n in self.prepared.graph.node if n.name == node), None)
        floats = {i.name: i for i in self.prepared.graph.initializer}
        edited = onnx.ModelProto()
        edited.CopyFrom(quantized)
        target = next((n for n in edited.graph.node if n.name == node), None)
        if source is None or target is None or len(source.input) != len(target.input):
            return edited
        dequantized = {n.output[0]: n for n in edited.graph.node if n.op_type == "DequantizeLinear"}
        constants = {i.name for i in edited.graph.initializer}
        for index, (before, now) in enumerate(zip(source.input, target.input)):
            producer = dequantized.get(now)
            if before in floats and producer is not None and producer.input[0] in constants:
                restored = onnx.TensorProto()
                restored.CopyFrom(floats[before])
                restored.name = f"{before}.float"
                edited.graph.initializer.append(restored)
                target.input[index] = restored.name
        return edited


PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel weights) came with opset 13


def _with_per_channel_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at opset 13 or later: onnxruntime's quantizer writes per-channel weights with an
    ``axis`` that an older opset's DequantizeLinear does not have (PP-OCR's opset-12 recogniser came
    out as a model onnxruntime refused to load). ONNX's version converter upgrades it."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if version >= PER_CHANNEL_OPSET:
        return model
    log.info("INT8: the model's opset %d is converted to %d for per-channel weights", version, PER_CHANNEL_OPSET)
    return onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)


def _pre_process(source: Path, target: Path) -> None:
    """onnxruntime's pre-processing; where its symbolic shape inference cannot finish (it raises a
    plain Exception: seen on PP-OCR's recogniser), without it: ONNX's own shape inference is what a
    CNN's quantization needs."""
    try:
        quant_pre_process(str(source), str(target))
    except Exception as exc:  # retried without the symbolic pass; a second failure is reported
        log.info("onnxruntime's symbolic shape inference failed (%s): pre-processing without it", first_line(exc))
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)


@contextlib.contextmanager
def _working_folder(folder: Path):
    """onnxruntime's symbolic shape inference saves its partial model into the working folder when
    it fails (``sym_shape_infer_temp.onnx`` and its data): into ours, never the user's."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes of a QDQ model that compute on dequantized tensors (the ones INT8 changes), in order."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node if n.op_type not in _QDQ_OPS and dequantized.intersection(n.input)]


@contextlib.contextmanager
def _one_error():
    try:
        yield
    except LowRankError:
        raise
    except Exception as exc:  # onnxruntime's tools raise anything; the user gets one line
        raise QuantizationError(f"onnxruntime's quantizer failed on the model: {first_line(exc)}",
                                hint="drop --quantize, or try another --int8-calibration") from None
