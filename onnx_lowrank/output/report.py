"""The report: per-layer plan and results, speedups, latency and fidelity, as JSON and as tables."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from onnx_lowrank.measure.fidelity import Fidelity


@dataclass
class LayerReport:
    name: str
    op: str  # Conv, ConvTranspose, Gemm or MatMul
    kernel: list[int]
    in_channels: int
    out_channels: int
    activation: str
    rank: int | None  # d' of the channel decomposition (r2 for Tucker-2)
    flops_before: int
    flops_after: int
    spatial_rank: int | None = None  # d'' of the k x 1 / 1 x k split
    input_rank: int | None = None  # r1 of Tucker-2
    energy: float | None = None
    response_error: float | None = None
    solver_iterations: list[int] | None = None  # per stage of the nonlinear solver's schedule
    skipped_reason: str | None = None
    note: str | None = None  # e.g. why a 3d layer stayed channel-only
    samples: int | None = None  # response samples collected for the layer
    seconds: dict[str, float] | None = None  # its solve and the re-collection of its input (Eq. 12, §3.5)


PROBE_LABEL = "probe"  # FrontierPoint.solver of a budget search's cheap probes
INT8_SUFFIX = " + int8"  # ends FrontierPoint.solver of a plan measured with INT8 on top
QUICK_SUFFIX = " (quick)"  # ends FrontierPoint.solver of a method run with a fifth of its solver's schedule


@dataclass
class FrontierPoint:
    """One plan a budget search measured: the speedup asked for, the theoretical conv speedup of the
    plan (None: infeasible), the budget's metric on the held-out set, whether it met the budget,
    and what solved it (a symmetric probe, a quick run of the method, or the method itself)."""

    speedup_target: float
    theoretical_speedup: float | None
    value: float | None
    met: bool
    solver: str


# Bumped whenever a key of the JSON report changes meaning or disappears (README: "The report").
SCHEMA_VERSION = 5  # 5: distill; 4: int8.kept_float maps a node to its reason and measured cost


@dataclass
class Report:
    speedup_target: float
    method: str
    rank_selection: str
    calibration: str
    calibration_samples: int
    theoretical_speedup: float  # over the compute of the layer kinds in --ops, what --speedup targets
    theoretical_model_speedup: float  # over every linear layer's compute
    layers: list[LayerReport]
    theoretical_speedup_by_kind: dict[str, float] = field(default_factory=dict)  # conv, transpose, dense
    latency_ms: dict[str, dict] = field(default_factory=dict)
    actual_speedup: dict[str, float | None] = field(default_factory=dict)
    fidelity: Fidelity | None = None
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_memory_mib: dict[str, float] = field(default_factory=dict)  # the process's peak so far as each stage ends
    dry_run: bool = False
    symmetric: bool = True
    # Cost of re-collecting the fitted inputs (Eq. 12, and the spatially split layers of asym3d), in
    # full conv passes over the calibration set (the sub-graphs up to each layer, summed); None when
    # every layer was solved from the original network's responses.
    asymmetric_collection_passes: float | None = None
    channel_speedup: float | None = None  # asym3d: the channel part's share of the target
    options: dict = field(default_factory=dict)  # every resolved option, the seed included
    versions: dict[str, str] = field(default_factory=dict)
    # "input": path and SHA-256 of the model file and its external data; "output": the same of what was written
    files: dict[str, dict | None] = field(default_factory=dict)
    budget: dict | None = None  # a budget search: the target, the figure measured, the search's time
    frontier: list[FrontierPoint] = field(default_factory=list)  # every plan a budget search measured
    # --quantize: original, low-rank, low-rank + int8 and int8 alone, each with its fidelity and latency
    stages: list[dict] = field(default_factory=list)
    # --objective latency: where the layers were timed, and the conv time (ms) before / after they predict
    latency_plan: dict | None = None
    int8: dict | None = None  # how INT8 was applied, and the nodes it kept in float
    distill: dict | None = None  # --distill: what was trained, the loss at each evaluation, held-out error before/after

    def to_dict(self) -> dict:
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        data["fidelity"] = asdict(self.fidelity) if self.fidelity is not None else None
        return data

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (an output that overflowed, say) is written as null."""
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _shape_text(layer: LayerReport) -> str:
    kernel = "×".join(map(str, layer.kernel))
    return f"{layer.op} {kernel + ' ' if kernel else ''}{layer.in_channels}→{layer.out_channels}"


def render(report: Report, console) -> None:
    """Print the report as rich tables on ``console``."""
    _render_layers(report, console)
    _render_summary(report, console)
    if report.stages:
        _render_stages(report, console)
    if report.frontier:
        _render_frontier(report, console)


def _render_layers(report: Report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"onnx-lowrank plan ({report.method}, {report.rank_selection} ranks)")
    table.add_column("layer", overflow="fold", min_width=12)
    for column in ("op k×k c→d", "ranks", "MFLOPs", "after", "energy", "error"):
        table.add_column(column, justify="right", no_wrap=column != "ranks")
    notes = []
    for layer in report.layers:
        note = layer.skipped_reason or layer.note
        marker = ""
        if note:
            notes.append(note)
            marker = f" [{len(notes)}]"
        table.add_row(
            escape(layer.name + marker), _shape_text(layer),
            _ranks(layer), f"{layer.flops_before / 1e6:.1f}", f"{layer.flops_after / 1e6:.1f}",
            _percent(layer.energy, 1), _number(layer.response_error, 3))
    before = sum(layer.flops_before for layer in report.layers)
    after = sum(layer.flops_after for layer in report.layers)
    table.add_row("total", "", "", f"{before / 1e6:.1f}", f"{after / 1e6:.1f}", "", "", style="bold")
    console.print(table)
    for index, note in enumerate(notes, 1):
        console.print(f"  [{index}] {note}", markup=False, highlight=False)
    if any(layer.spatial_rank is not None for layer in report.layers):
        console.print("  ranks: d'' = channels of the k×1 conv, d' = channels before the 1×1 conv",
                      markup=False, highlight=False)


def _render_summary(report: Report, console) -> None:
    from rich.table import Table

    summary = Table(title="speedup and fidelity", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("target speedup", f"{report.speedup_target:.2f}×")
    summary.add_row("theoretical speedup", f"{report.theoretical_speedup:.2f}×")
    if len(report.theoretical_speedup_by_kind) > 1:
        for kind, value in report.theoretical_speedup_by_kind.items():
            summary.add_row(f"  {kind} layers", f"{value:.2f}×")
    summary.add_row("theoretical whole-model FLOP speedup", f"{report.theoretical_model_speedup:.2f}×")
    if report.channel_speedup is not None:
        summary.add_row("channel part of the speedup (3d)", f"{report.channel_speedup:.2f}×")
    if report.asymmetric_collection_passes is not None:
        summary.add_row("asymmetric re-collection cost", f"{report.asymmetric_collection_passes:.2f} passes")
    if report.latency_plan is not None:
        before, after = report.latency_plan["predicted_ms"]
        summary.add_row(f"predicted conv speedup ({report.latency_plan['provider']}, layers timed alone)",
                        f"{before / after:.2f}×")
        for step in report.latency_plan.get("in_model") or []:
            summary.add_row(f"  plan for {step['asked']:.2f}×: predicted / measured "
                            f"({report.latency_plan['in_model_measure']})",
                            f"{step['predicted']:.2f}× / {step['measured']:.2f}×")
    if report.distill is not None:
        _distill_rows(report.distill, summary)
    _latency_rows(report, summary)
    _fidelity_rows(report.fidelity, summary)
    console.print(summary)


def _distill_rows(distill: dict, summary) -> None:
    from rich.markup import escape

    if "held_out_error" in distill:
        error = distill["held_out_error"]
        summary.add_row(f"distillation ({distill['trained']}, {distill['steps']} steps, {distill['seconds']:.0f} s, "
                        f"{distill['device']}): held-out error", f"{error['before']:.4f} → {error['after']:.4f}")
    summary.add_row("distilled model written", "yes" if distill["applied"] else escape(f"no: {distill['reason']}"))


def _latency_rows(report: Report, summary) -> None:
    from rich.markup import escape

    for provider, latency in report.latency_ms.items():
        if latency.get("original") is None:
            summary.add_row(escape(f"latency {provider}"), escape(latency.get("status", "not measured")))
            continue
        summary.add_row(f"latency {provider} original / optimized",
                        f"{latency['original']:.2f} ms / {latency['optimized']:.2f} ms")
        if "p90" in latency:
            summary.add_row(f"latency {provider} p90, original / optimized",
                            f"{latency['p90']['original']:.2f} ms / {latency['p90']['optimized']:.2f} ms")
            summary.add_row(f"throughput {provider} (batch {latency['batch']}), original / optimized",
                            f"{latency['throughput']['original']:.0f} / {latency['throughput']['optimized']:.0f} /s")
        summary.add_row(f"measured speedup {provider}", f"{report.actual_speedup[provider]:.2f}×")


def _fidelity_rows(fidelity, summary) -> None:
    from rich.markup import escape

    if fidelity is not None:
        on = f" (n={fidelity.samples})"  # every figure says how many held-out samples back it
        for name, error in fidelity.output_rel_error.items():
            summary.add_row(escape(f"relative L2 error of output {name!r}"), f"{error:.4f}{on}")
        if fidelity.top1_agreement is not None:
            summary.add_row("top-1 agreement with original", _percent(fidelity.top1_agreement) + on)
        if fidelity.top5_overlap is not None:
            summary.add_row("top-5 overlap with original", _percent(fidelity.top5_overlap) + on)
        if fidelity.accuracy_original is not None:
            summary.add_row("accuracy original → optimized",
                            f"{_percent(fidelity.accuracy_original)} → {_percent(fidelity.accuracy_optimized)}{on}")


def _render_stages(report: Report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    providers = list(dict.fromkeys(p for stage in report.stages for p in stage["latency_ms"]))
    samples = report.stages[0]["fidelity"]["samples"]
    table = Table(title=f"stages (fidelity on {samples} held-out samples; latency p50 / p90)")
    for column in ("stage", "output error (worst)", "top-1 agreement", "accuracy", *(f"{p} ms" for p in providers),
                   *(f"{p} speedup" for p in providers)):
        table.add_column(escape(column), justify="left" if column == "stage" else "right", no_wrap=column == "stage")
    base = report.stages[0]["latency_ms"]
    for stage in report.stages:
        fidelity = stage["fidelity"] or {}
        error = fidelity.get("output_rel_error") or {}
        latency = stage["latency_ms"]
        name = stage["stage"] + (f" ({stage['kept_float']} float)" if stage.get("kept_float") else "")
        table.add_row(name + (" *" if stage.get("written") else ""), _number(max(error.values(), default=None), 4),
                      _percent(fidelity.get("top1_agreement")), _percent(fidelity.get("accuracy_optimized")),
                      *(f"{latency[p]['p50']:.2f} / {latency[p]['p90']:.2f}" for p in providers),
                      *(f"{base[p]['p50'] / latency[p]['p50']:.2f}×" for p in providers))
    console.print(table)
    console.print("  * written to OUT", markup=False, highlight=False)
    if report.int8:
        _render_int8(report.int8, console)


def _render_int8(int8: dict, console) -> None:
    """What the INT8 guard kept in float, and why; or why the float model was written."""
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    kept = int8["kept_float"]
    if kept:
        say(f"  kept in float by the INT8 guard ({int8['tolerance']}); output error with each alone in "
            f"INT8 ({int8['guard']['ranking_samples']} calibration samples):")
        for name, why in sorted(kept.items(), key=lambda item: -item[1]["error_alone"]):
            say(f"    {name}: {why['error_alone']:.4f}, {why['reason']}")
    if int8["written"] == "float":
        say(f"  INT8 missed the tolerance ({int8['tolerance']}): {int8['guard']['failure']}; the float model "
            "was written")


def _render_frontier(report: Report, console) -> None:
    from rich.table import Table

    table = Table(title=f"budget search: {report.budget['target']}")
    for column in ("speedup asked", "theoretical", report.budget["kind"], "met", "solved by"):
        table.add_column(column, justify="right" if column != "solved by" else "left")
    for point in report.frontier:
        table.add_row(f"{point.speedup_target:.2f}×", "-" if point.theoretical_speedup is None
                      else f"{point.theoretical_speedup:.2f}×", "-" if point.value is None else f"{point.value:.4g}",
                      "yes" if point.met else "no", point.solver)
    console.print(table)
    console.print(f"  chosen: {report.theoretical_speedup:.2f}× with {report.budget['kind']} "
                  f"{report.budget['measured']:.4g} on {report.budget['held_out_samples']} held-out samples; "
                  f"search {report.budget['search_s']:.1f} s", markup=False, highlight=False)


def _ranks(layer: LayerReport) -> str:
    if layer.input_rank is not None:
        return f"r1={layer.input_rank} r2={layer.rank}"
    parts = []
    if layer.spatial_rank is not None:
        parts.append(f"d''={layer.spatial_rank}")
    if layer.rank is not None:
        parts.append(f"d'={layer.rank}" if parts else str(layer.rank))
    return " ".join(parts) or "-"


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
