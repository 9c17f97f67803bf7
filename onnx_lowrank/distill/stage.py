"""The distillation stage of a run: the low-rank model trained toward the original (paper §3.6)
on the calibration data, no labels; what was done, in the report's ``distill`` section.

It never fails a run: where the model cannot be converted or trained, or the trained model does
not reproduce in onnxruntime, or measures worse on the held-out data than the undistilled one,
one warning and the undistilled model go on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnx_lowrank.distill.convert import TorchStudent, with_weights
from onnx_lowrank.distill.train import Budget, distillation_loss, train
from onnx_lowrank.graph.surgery import prefix_model
from onnx_lowrank.measure.context import Measuring
from onnx_lowrank.measure.fidelity import compare_outputs, held_out_outputs, looks_like_class_scores
from onnx_lowrank.options import Options
from onnx_lowrank.runtime.sessions import iterate_batches, make_session, run, with_outputs

log = logging.getLogger(__name__)

VALIDATION_SHARE = 0.15  # of the calibration pictures, held out of training for early stopping
MAX_VALIDATION = 32
REPRODUCTION_TOLERANCE = 1e-4  # onnxruntime vs torch on the trained weights, relative to the output's scale


@dataclass
class Distilled:
    model: onnx.ModelProto  # the distilled model, or the one given where distillation did not apply
    section: dict


def distill(measuring: Measuring, student_model: onnx.ModelProto, hints: list[str], opts: Options) -> Distilled:
    """``student_model`` trained toward the original on the calibration samples; ``hints`` are the
    decomposed layers' output tensors, matched to the original's as well as the outputs."""
    clock = time.perf_counter()
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    device = torch.device(opts.distill_device)
    train_indices, validation_indices = _split(measuring.data.source, measuring.data.calib_indices)
    trainable = _trainable(student_model, measuring.normalised, opts.distill_all_weights)
    converted = _convert(student_model, hints, trainable, _inputs_of(student_model, measuring, validation_indices[0]))
    if isinstance(converted, str):
        return _not_applied(student_model, converted, measuring)
    student, outputs, scope = converted
    teacher = make_session(with_outputs(measuring.normalised, outputs + hints), threads=opts.threads)
    student.module.to(device)
    batches = _Batches(measuring.data.source, teacher, outputs + hints, measuring.data.batch, device)
    validation = batches.of(validation_indices)
    first = next(iter(validation))
    class_scores = {n for n in outputs if looks_like_class_scores(first[1][n].cpu().numpy())}

    def loss_of(student_outputs, targets):
        return distillation_loss(student_outputs, targets, outputs, hints, class_scores)

    def score_of(student_outputs, targets):  # the outputs alone where there are any: what the run is judged on
        return distillation_loss(student_outputs, targets, outputs, [] if outputs else hints, class_scores)

    rng = np.random.default_rng(opts.seed)
    advance = measuring.progress.stage("distilling (seconds of --distill-time)", int(opts.distill_time))
    ticker = _SecondsTicker(advance)
    with measuring.run.stage("distill", f"distilling {len(student.trainable)} weight tensors on "
                                        f"{len(train_indices)} samples ({device.type})"):
        history = train(student, lambda epoch: batches.of(rng.permutation(train_indices).tolist()), validation,
                        loss_of, score_of, Budget(opts.distill_steps, opts.distill_time), ticker)
    # The check against onnxruntime runs in float32 on the CPU: CUDA's convolutions use TF32 (about
    # 1e-3 relative on the H200), which would fail a faithful write-back.
    student.module.cpu()
    distilled = with_weights(student_model, student.state())
    section = {"applied": False, "scope": scope, "trained": "all weights" if opts.distill_all_weights else "factors",
               "tensors": len(student.trainable), "parameters": int(sum(p.numel() for p in student.parameters())),
               "train_samples": len(train_indices), "validation_samples": len(validation_indices),
               "hints": len(hints), "device": device.type, "steps": history.steps, "best_step": history.best_step,
               "stopped": history.stopped, "history": history.evaluations}
    gap = _reproduction_gap(distilled, student, first, outputs or hints, opts.threads)
    section["onnxruntime_vs_torch"] = gap
    if gap > REPRODUCTION_TOLERANCE:
        measuring.run.warn(f"distillation: onnxruntime does not reproduce the trained weights ({gap:.2g} relative); "
                           "the undistilled model is kept")
        return Distilled(student_model, {**section, "reason": "onnxruntime does not reproduce the trained module"})
    section["seconds"] = round(time.perf_counter() - clock, 2)
    return _better_of(measuring, student_model, distilled, section, opts.threads)


def _better_of(measuring: Measuring, undistilled: onnx.ModelProto, distilled: onnx.ModelProto, section: dict,
               threads: int) -> Distilled:
    """The distilled model where its worst output error on the held-out data is lower, else the undistilled."""
    reference = held_out_outputs(measuring.reference, measuring.data, threads)
    before = _worst_error(reference, held_out_outputs(undistilled, measuring.data, threads, produced=True))
    after = _worst_error(reference, held_out_outputs(distilled, measuring.data, threads, produced=True))
    section["held_out_error"] = {"before": before, "after": after}
    log.info("distillation: held-out output error %.4f -> %.4f in %d steps", before, after, section["steps"])
    if not after < before:
        measuring.run.warn(f"distillation did not help on the held-out data ({before:.4f} -> {after:.4f}); "
                           "the undistilled model is kept")
        return Distilled(undistilled, {**section, "reason": "no better on the held-out data"})
    return Distilled(distilled, {**section, "applied": True})


def _convert(model: onnx.ModelProto, hints: list[str], trainable: list[str], sample: list[torch.Tensor]
             ) -> tuple[TorchStudent, list[str], str] | str:
    """The student as torch, the outputs it is trained on, and what of the model that is; where the
    whole model does not convert or run in torch, the sub-graph up to the last decomposed layer
    (every layer that was decomposed, and the hints as its only targets); else why not."""
    outputs = [o.name for o in model.graph.output]
    whole = _runnable(with_outputs(model, outputs + hints), trainable, sample)
    if isinstance(whole, TorchStudent):
        return whole, outputs, "the whole model"
    prefix = prefix_model(model, hints)
    kept = {i.name for i in prefix.graph.initializer}
    part = _runnable(prefix, [name for name in trainable if name in kept], sample)
    if isinstance(part, TorchStudent):
        return part, [], (f"the part up to the last decomposed layer ({len(prefix.graph.node)} of "
                          f"{len(model.graph.node)} nodes): the rest {whole}")
    return f"the model {whole}, nor its part up to the last decomposed layer ({part})"


def _runnable(model: onnx.ModelProto, trainable: list[str], sample: list[torch.Tensor]) -> TorchStudent | str:
    """The model as a torch student that runs on ``sample``, or why not."""
    try:
        student = TorchStudent(model, trainable)
    except Exception as exc:  # onnx2torch raises what each converter does on an op it cannot take
        return f"does not convert to torch ({_first_line(exc)})"
    try:
        with torch.no_grad():
            student(sample)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:  # a converted op torch cannot run
        return f"does not run in torch ({_first_line(exc)})"
    return student


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _inputs_of(model: onnx.ModelProto, measuring: Measuring, index: int) -> list[torch.Tensor]:
    """One sample's feeds, in the order of the model's inputs, as the converted module takes them."""
    weights = {i.name for i in model.graph.initializer}
    feeds = measuring.data.source.get([index])
    return [torch.from_numpy(np.ascontiguousarray(feeds[i.name])) for i in model.graph.input if i.name not in weights]


def _not_applied(model: onnx.ModelProto, why: str, measuring: Measuring) -> Distilled:
    measuring.run.warn(f"distillation did not apply: {why}; the undistilled model is kept")
    return Distilled(model, {"applied": False, "reason": why})


def _trainable(student: onnx.ModelProto, teacher: onnx.ModelProto, every_weight: bool) -> list[str]:
    """The float initializers to train: those the rewrite made (the factors and their biases), or
    every float weight."""
    original = {i.name for i in teacher.graph.initializer}
    floats = [i for i in student.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 1]
    return [i.name for i in floats if every_weight or i.name not in original]


def _split(source, indices: list[int]) -> tuple[list[int], list[int]]:
    """Training and validation samples, apart by picture: the views of one picture (``--augment``)
    stay on one side; the validation pictures are the last ones, as the held-out block of arrays."""
    views = getattr(source, "views", 1)
    pictures = sorted({i // views for i in indices})
    count = min(MAX_VALIDATION // views or 1, max(1, round(len(pictures) * VALIDATION_SHARE)))
    if len(pictures) < 2:
        return list(indices), list(indices)
    held = set(pictures[-count:])
    return [i for i in indices if i // views not in held], [i for i in indices if i // views in held]


class _Batches:
    """Batches of (inputs, the teacher's outputs and hints) as torch tensors. The teacher runs in
    onnxruntime on each batch as it is asked for: the hints of every layer for every sample would
    take gigabytes on a detector, and a teacher pass costs a fraction of a training step."""

    def __init__(self, source, teacher, names: list[str], batch: int, device: torch.device) -> None:
        self.source, self.teacher, self.names, self.batch, self.device = source, teacher, names, batch, device
        self.inputs = [i.name for i in teacher.get_inputs()]

    def of(self, indices: list[int]) -> "_Epoch":
        return _Epoch(self, list(indices))

    def lazy(self, indices):
        for _, feeds in iterate_batches(self.source, indices, self.batch):
            targets = dict(zip(self.names, run(self.teacher, self.names, feeds)))
            yield ([torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.inputs],
                   {n: torch.from_numpy(v).to(self.device) for n, v in targets.items()})


@dataclass
class _Epoch:
    """The batches of ``indices``, made as they are iterated."""

    batches: _Batches
    indices: list[int]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batches.batch)

    def __iter__(self):
        return self.batches.lazy(self.indices)


class _SecondsTicker:
    """Progress in seconds of the time budget, from a per-step callback."""

    def __init__(self, advance) -> None:
        self.advance, self.started, self.told = advance, time.perf_counter(), 0

    def __call__(self, step: int = 1) -> None:
        elapsed = int(time.perf_counter() - self.started)
        if elapsed > self.told:
            self.advance(elapsed - self.told)
            self.told = elapsed


def _reproduction_gap(model: onnx.ModelProto, student: TorchStudent, batch, outputs: list[str], threads: int) -> float:
    """The largest difference between onnxruntime on the written weights and the torch module,
    relative to each output's largest magnitude."""
    inputs = [tensor.cpu() for tensor in batch[0]]
    session = make_session(with_outputs(model, outputs), threads=threads, produced=True)
    feeds = {i.name: tensor.cpu().numpy() for i, tensor in zip(session.get_inputs(), inputs)}
    expected = dict(zip(outputs, run(session, outputs, feeds, produced=True)))
    with torch.no_grad():
        got = student(inputs)
    return max(float(np.abs(got[n].cpu().numpy() - expected[n]).max() / (np.abs(expected[n]).max() + 1e-12))
               for n in outputs)


def _worst_error(reference: dict, outputs: dict) -> float:
    return float(max(compare_outputs(reference, outputs).output_rel_error.values()))
