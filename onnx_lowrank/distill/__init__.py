"""Distillation of the low-rank model toward the original, on the ONNX model itself (paper §3.6).

Needs the ``[distill]`` extra (torch and onnx2torch); ``require`` says so in one line before any
work. The stage is ``distill.stage.distill``, imported only when a run asks for it.
"""

from __future__ import annotations

import importlib.util

from onnx_lowrank.errors import InvalidOptionError


def require(device: str) -> None:
    """Refuse ``--distill`` before any work where it cannot run here."""
    missing = [name for name in ("torch", "onnx2torch") if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidOptionError(f"--distill needs {' and '.join(missing)}", hint="pip install 'onnx-lowrank[distill]'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidOptionError("--distill-device cuda: torch sees no CUDA device here",
                                     hint="use --distill-device cpu, or a CUDA build of torch on a GPU machine")
