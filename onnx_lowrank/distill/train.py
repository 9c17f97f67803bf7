"""Training the student toward the teacher's outputs and hints (paper §3.6, without labels).

The loss is the paper's reconstruction objective taken end to end: for each model output and
each decomposed layer's output (a hint), the squared error relative to the teacher's energy
there, so every term is scale-free and a layer counts as much as another; outputs that are class
scores also get the KL divergence of their softmax at a temperature. Adam with a *relative* step
(each tensor's learning rate scaled by its RMS), so one default moves every layer of every model
by the same fraction; the best weights by validation loss are kept (early stopping), the step
warms up over the first steps and halves when validation stalls, and the loop ends at the step or
time budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from onnx_lowrank.distill.convert import TorchStudent

log = logging.getLogger(__name__)

RELATIVE_STEP = 1e-3  # Adam's step per tensor, as a fraction of the tensor's RMS
WARMUP_STEPS = 10  # the step grows linearly to it: Adam's first steps move every weight by the full step
TEMPERATURE = 2.0  # of the KL term on class scores
EVALUATIONS_PER_EPOCH = 2
PATIENCE = 6  # evaluations without a better validation loss before stopping
HALVE_AFTER = 2  # evaluations without improvement before the step halves


@dataclass
class Budget:
    """When training stops: ``steps`` (None: no limit), ``seconds`` of wall clock."""

    steps: int | None
    seconds: float


@dataclass
class History:
    """Validation (and the mean training) loss at each evaluation, and where the best was."""

    evaluations: list[dict] = field(default_factory=list)
    best_step: int = 0
    steps: int = 0
    stopped: str = ""


def distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      outputs: list[str], hints: list[str], class_scores: set[str]) -> torch.Tensor:
    """Mean relative squared error over the outputs, plus over the hints, plus the KL terms."""
    def relative(name: str) -> torch.Tensor:
        target = teacher[name]
        return torch.mean((student[name] - target) ** 2) / (torch.mean(target ** 2) + 1e-12)

    terms = [torch.stack([relative(name) for name in names]).mean() for names in (outputs, hints) if names]
    loss = torch.stack(terms).sum()
    for name in class_scores:
        t = TEMPERATURE
        target = torch.log_softmax(teacher[name].flatten(1) / t, dim=1)
        predicted = torch.log_softmax(student[name].flatten(1) / t, dim=1)
        loss = loss + t * t * torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="batchmean")
    return loss


def train(student: TorchStudent, batches: Callable[[int], list[tuple[list[torch.Tensor], dict]]],
          validation: list[tuple[list[torch.Tensor], dict]], loss_of: Callable, score_of: Callable, budget: Budget,
          progress: Callable[[int], None] = lambda n=1: None) -> History:
    """Train ``student`` on ``batches(epoch)`` (inputs, teacher targets) by ``loss_of`` until the
    budget or patience ends; the best weights by ``score_of`` on ``validation`` (what the run is
    judged on: the outputs) are loaded at the end."""
    parameters = student.parameters()
    groups = [{"params": [p], "lr": RELATIVE_STEP * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)}
              for p in parameters]
    optimizer = torch.optim.Adam(groups)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    history, best_state = History(), student.state()
    started = time.perf_counter()

    def validation_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(score_of(student(inputs), targets)) for inputs, targets in validation]))

    history.evaluations.append({"step": 0, "epoch": 0.0, "validation_loss": validation_loss(), "train_loss": None,
                                "seconds": 0.0})
    stale, epoch = 0, 0
    while not history.stopped:
        epoch_batches = batches(epoch)
        every = max(1, len(epoch_batches) // EVALUATIONS_PER_EPOCH)
        recent: list[float] = []
        for position, (inputs, targets) in enumerate(epoch_batches, 1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(student(inputs), targets)
            loss.backward()
            optimizer.step()
            warmup.step()
            recent.append(float(loss.detach()))
            history.steps += 1
            progress(1)
            over_time = time.perf_counter() - started > budget.seconds
            over_steps = budget.steps is not None and history.steps >= budget.steps
            if position % every and position != len(epoch_batches) and not (over_time or over_steps):
                continue
            current = validation_loss()
            history.evaluations.append({"step": history.steps, "epoch": round(epoch + position / len(epoch_batches), 3),
                                        "validation_loss": current, "train_loss": float(np.mean(recent)),
                                        "seconds": round(time.perf_counter() - started, 2)})
            recent = []
            if current < min(e["validation_loss"] for e in history.evaluations[:-1]):
                best_state, history.best_step, stale = student.state(), history.steps, 0
            else:
                stale += 1
                if stale % HALVE_AFTER == 0:
                    warmup.base_lrs = [lr / 2 for lr in warmup.base_lrs]
            if over_time or over_steps or stale >= PATIENCE:
                history.stopped = "time" if over_time else "steps" if over_steps else "no better validation loss"
                break
        epoch += 1
    student.load(best_state)
    log.debug("distillation: %d steps, best at %d, stopped on %s", history.steps, history.best_step, history.stopped)
    return history
