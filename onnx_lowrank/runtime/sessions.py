"""onnxruntime sessions, batched runs and response collection.

Collection exposes the wanted intermediate tensors as extra graph outputs and runs the calibration
batches with onnxruntime's graph optimisations on (they never remove or change a graph output,
and layout transforms and fusions elsewhere make the passes about twice as fast), keeping only a
fixed number of sampled spatial positions per image and tensor: memory grows with the sample
count, never with the size of the feature maps.
"""

from __future__ import annotations

import zlib
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.errors import InternalError, ModelLoadError, ModelRunError, ProviderError
from onnx_lowrank.graph.io import first_line, model_file, needs_file, weights_apart
from onnx_lowrank.runtime.calibration import InputSpec

# What onnxruntime raises for a model or data it cannot take: its own exception classes, and the
# ValueError/TypeError/RuntimeError its Python layer raises for feeds; anything else is a bug of ours.
ORT_ERRORS = tuple(cls for cls in vars(ort.capi.onnxruntime_pybind11_state).values()
                   if isinstance(cls, type) and issubclass(cls, Exception)) + (ValueError, TypeError, RuntimeError)

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
# onnxruntime's builds are alternative packages, each installing the module ``onnxruntime``:
# a provider comes from choosing the build (this package's extras), never from adding a second.
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                      "onnxruntime-qnn", "onnxruntime-training")
PROVIDER_NEEDS = {"cpu": "onnxruntime (pip install 'onnx-lowrank[cpu]')",
                  "cuda": "onnxruntime-gpu in place of onnxruntime (pip install 'onnx-lowrank[gpu]' in an "
                          "environment without onnxruntime) and a CUDA device",
                  "tensorrt": "onnxruntime-gpu in place of onnxruntime (pip install 'onnx-lowrank[gpu]' in an "
                              "environment without onnxruntime), TensorRT's libraries and a CUDA device",
                  "openvino": "onnxruntime-openvino in place of onnxruntime (pip install 'onnx-lowrank[openvino]' "
                              "in an environment without onnxruntime)"}


def onnxruntime_builds() -> dict[str, str]:
    """The installed onnxruntime builds and their versions."""
    installed = {}
    for name in ONNXRUNTIME_BUILDS:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return installed


def mixed_builds_warning(installed: dict[str, str]) -> str | None:
    """A warning when more than one build is installed: their files overwrite each other's, so the
    module may hold parts of both and providers may be missing or fail to start."""
    if len(installed) < 2:
        return None
    names = sorted(installed)
    keep = next((n for n in names if n != "onnxruntime"), names[0])
    return (f"{' and '.join(f'{n} {installed[n]}' for n in names)} are installed together: each installs the module "
            f"'onnxruntime' over the other's files, so providers may be missing or fail to start; keep one "
            f"(pip uninstall -y {' '.join(names)} && pip install {keep})")


def provider_available(provider: str) -> bool:
    return PROVIDER_NAMES[provider] in ort.get_available_providers()


def make_session(model: onnx.ModelProto | bytes | Path, *, optimize: bool = True, threads: int = 0,
                 provider: str = "cpu", profile_prefix: str | None = None, produced: bool = False,
                 prepack: bool = True) -> ort.InferenceSession:
    """A session of ``model``: a model file as it is (external data and all), a model too large for
    one protobuf through a file with external data (see ``graph.io.model_file``); with a
    ``profile_prefix``, onnxruntime's profiler writes its node timings there. A model this tool
    ``produced`` that onnxruntime refuses is a bug of ours (``InternalError``), not bad input.
    Without ``prepack``, the weights are not also kept re-laid-out for the matrix kernels: a
    session run over a few batches only, with no second copy of a large dense layer's weights."""
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # failures surface as exceptions, told in one line
    # Spinning idle pools of one session steal the cores of the other in interleaved timing.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    providers = [PROVIDER_NAMES[provider]]
    try:
        if isinstance(model, Path):
            session = ort.InferenceSession(str(model), options, providers=providers)
        elif isinstance(model, bytes):
            session = ort.InferenceSession(model, options, providers=providers)
        elif not needs_file(model):
            # onnxruntime copies them into the graph on load (OrtApi::AddExternalInitializers): the
            # arrays go once the session exists, a copy of the weights less than a serialised model.
            light, arrays = weights_apart(model)
            options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(v) for v in arrays.values()])
            session = ort.InferenceSession(light.SerializeToString(), options, providers=providers)
        else:
            with model_file(model) as path:  # onnxruntime has read the weights once the session exists
                session = ort.InferenceSession(str(path), options, providers=providers)
    except ORT_ERRORS as exc:
        if produced:
            raise InternalError(f"onnxruntime cannot load a model onnx-lowrank made: {first_line(exc)}") from None
        raise ModelLoadError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
    # onnxruntime falls back to CPU without a word when a provider cannot start (no device, a
    # missing library): a CPU figure must never be reported as another provider's.
    if providers[0] not in session.get_providers():
        raise ProviderError(f"onnxruntime could not start {providers[0]} (it fell back to "
                            f"{', '.join(session.get_providers())})", hint=f"{provider} needs {PROVIDER_NEEDS[provider]}")
    return session


def run(session: ort.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray],
        produced: bool = False) -> list[np.ndarray]:
    """``session.run`` on the user's data: a failure of the user's model is bad input, one line; of a
    model this tool ``produced``, on data the original ran on, a bug of ours."""
    try:
        return session.run(names, feeds)
    except ORT_ERRORS as exc:
        if produced:
            raise InternalError(f"onnxruntime cannot run a model onnx-lowrank made: {first_line(exc)}") from None
        raise ModelRunError(f"onnxruntime cannot run the model on the given data: {first_line(exc)}",
                            hint="check that the data has the shape, type and range the model expects") from None


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (``model`` itself if it does)."""
    if set(names) <= {o.name for o in model.graph.output}:
        return model
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return exposed


def batch_size_for(inputs: list[InputSpec], preferred: int) -> int:
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    return fixed.pop() if fixed else preferred


def batch_chunks(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` in batches of at most ``batch_size``, in order: every batched run's batches."""
    return [list(indices[start:start + batch_size]) for start in range(0, len(indices), batch_size)]


def iterate_batches(source, indices: Sequence[int], batch_size: int):
    """Yield (index chunk, feeds) of at most ``batch_size`` samples each."""
    for chunk in batch_chunks(indices, batch_size):
        yield chunk, source.get(chunk)


def run_in_batches(session: ort.InferenceSession, source, indices: Sequence[int], batch_size: int,
                   on_batch: Callable[[list[int], dict[str, np.ndarray], list[np.ndarray]], None],
                   names: list[str] | None = None, produced: bool = False) -> None:
    names = names or [o.name for o in session.get_outputs()]
    for chunk, feeds in iterate_batches(source, indices, batch_size):
        on_batch(chunk, feeds, run(session, names, feeds, produced))


def sample_positions(seed: int, image_index: int, tensor: str, spatial: int, count: int) -> np.ndarray:
    """Spatial positions sampled for one image and tensor; the same in every run with the same seed,
    so responses of the original and of a partly replaced network pair up sample by sample."""
    rng = np.random.default_rng([seed, image_index, zlib.crc32(tensor.encode())])
    return np.sort(rng.choice(spatial, size=min(count, spatial), replace=False))


def collect_responses(model: onnx.ModelProto, source, indices: Sequence[int], tensors: Sequence[str],
                      **sampling) -> dict[str, np.ndarray]:
    """Sampled responses of ``tensors`` (``collect_responses_and_values`` without values)."""
    return collect_responses_and_values(model, source, indices, tensors, **sampling)[0]


def collect_responses_and_values(model: onnx.ModelProto, source, indices: Sequence[int], tensors: Sequence[str], *,
                                 samples_per_image: int | dict[str, int], seed: int, batch_size: int,
                                 threads: int = 0, channel_axes: dict[str, int] | None = None,
                                 progress: Callable[[int], None] | None = None,
                                 sampled_as: dict[str, str] | None = None, whole: Sequence[str] = (),
                                 whole_bytes: int = 0) -> tuple[dict[str, np.ndarray], list[dict] | None]:
    """Sampled responses ``(len(indices) * positions, channels)`` of each tensor in ``tensors``;
    ``samples_per_image`` is one count for all tensors or a count per tensor. A tensor's channels
    are its axis 1 (NC...) unless ``channel_axes`` names another (-1 for a dense layer's
    ``[B, ..., N]``); every other axis after the batch is a position. A tensor named in
    ``sampled_as`` is sampled (positions, count, axis) as the tensor it maps to, so that the two
    pair up sample by sample.

    Also returns the values of the tensors in ``whole``, unsampled, batch by batch as computed
    (nothing assumes where their batch axis is); None where they would take more than
    ``whole_bytes``."""
    session = make_session(with_outputs(model, [*tensors, *whole]), threads=threads, prepack=False)
    output_names = [o.name for o in session.get_outputs()]
    wanted = {name: output_names.index(name) for name in tensors}
    # Filled in place once the first batch shows each tensor's size: no list of chunks to concatenate.
    responses: dict[str, np.ndarray] = {}
    filled = {name: 0 for name in tensors}
    batches: list[dict[str, np.ndarray]] | None = [] if whole else None
    held = 0

    def keep(chunk: list[int], feeds: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        nonlocal batches, held
        if batches is not None:
            batches.append({name: outputs[output_names.index(name)] for name in whole})
            held += sum(value.nbytes for value in batches[-1].values())
            if held > whole_bytes:
                batches = None
        for name, position in wanted.items():
            maps = outputs[position]
            key = (sampled_as or {}).get(name, name)
            axis = (channel_axes or {}).get(key, 1)
            if maps.ndim < 2:
                raise ModelRunError(f"the response {name!r} has shape {maps.shape}: no batch and channel axes",
                                    hint="skip the layer that computes it (--skip)")
            if axis % maps.ndim != 1:
                maps = np.moveaxis(maps, axis, 1)
            flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
            count = samples_per_image[key] if isinstance(samples_per_image, dict) else samples_per_image
            per_image = min(count, flat.shape[2])
            if name not in responses:
                responses[name] = np.empty((len(indices) * per_image, flat.shape[1]), np.float32)
            for row, image_index in enumerate(chunk):
                picked = sample_positions(seed, image_index, key, flat.shape[2], count)
                responses[name][filled[name]:filled[name] + per_image] = flat[row][:, picked].T
                filled[name] += per_image
        if progress is not None:
            progress(len(chunk))

    run_in_batches(session, source, indices, batch_size, keep)
    for name, values in responses.items():
        if not np.all(np.isfinite(values)):
            raise ModelRunError(f"the model's response {name!r} to the calibration data contains NaN or infinity",
                                hint="check the data's range and preprocessing (--preprocess, --mean, --std)")
    return responses, batches


def probe_shapes(model: onnx.ModelProto, source, tensors: Sequence[str], batch_size: int,
                 threads: int = 0) -> dict[str, tuple]:
    """Actual shapes of ``tensors`` for one calibration batch (shape inference misses dynamic dims)."""
    feeds = source.get(list(range(batch_size)))
    computed = [name for name in tensors if name not in feeds]
    session = make_session(with_outputs(model, computed), optimize=False, threads=threads, prepack=False)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, run(session, names, feeds)))
    # A sequence or map value (no shape) is None: it cannot be measured (nor carried).
    return {name: tuple(feeds[name].shape) if name in feeds else
            (tuple(outputs[name].shape) if hasattr(outputs[name], "shape") else None) for name in tensors}
