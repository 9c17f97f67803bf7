"""Which layers a run decomposes: the user's --skip and --ops, and what the method can build."""

from __future__ import annotations

import logging
from typing import Sequence

from onnx_lowrank.errors import InvalidOptionError, NothingToDecomposeError
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.options import Options

log = logging.getLogger(__name__)


def select_units(units: list[Unit], opts: Options) -> set[str]:
    """Mark the user's --skip layers; return the --channel-only names; refuse a model with nothing to do."""
    skip_names = resolve_names(units, opts.skip, "skip")
    for unit in units:
        if not unit.decomposable:
            continue
        if unit.name in skip_names:
            unit.skipped_reason = "skipped by --skip"
        elif unit.kind not in opts.ops:
            unit.skipped_reason = f"{unit.kind} layers are not in --ops"
        elif opts.spec.splits_kernel and (unit.kind != "conv" or len(unit.kernel) != 2 or unit.group > 1):
            unit.skipped_reason = f"{opts.method} decomposes 2-D convs with group=1 only"
    channel_only = resolve_names(units, opts.channel_only, "channel_only")
    if not any(u.decomposable for u in units):
        reasons = sorted({u.skipped_reason for u in units}) or ["the model has no Conv, ConvTranspose, Gemm or MatMul"]
        raise NothingToDecomposeError("the model has no decomposable layer (" + "; ".join(reasons) + ")",
                                      hint="onnx-lowrank decomposes Conv (1-, 2-, 3-D, group=1), ConvTranspose and "
                                           "Gemm/MatMul layers with constant weights")
    log.debug("%d layers, %d decomposable", len(units), sum(u.decomposable for u in units))
    return channel_only


def resolve_names(units: list[Unit], values: Sequence[str], option: str) -> set[str]:
    """Layer names given to ``option``. A value is a name as it stands (names may contain commas);
    only a value that names no layer is read as a comma-separated list of names."""
    known = {u.name for u in units}
    names, unknown = set(), []
    for value in values:
        parts = [value] if value in known else [part for part in value.split(",") if part]
        names.update(part for part in parts if part in known)
        unknown.extend(part for part in parts if part not in known)
    if unknown:
        flag = "--" + option.replace("_", "-")
        raise InvalidOptionError(f"{flag} names no layer in the model: {', '.join(map(repr, unknown))}",
                                 hint="the report lists the layer names; --dry-run prints them")
    return names
