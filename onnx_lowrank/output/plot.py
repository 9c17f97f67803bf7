"""``--plot``: the frontier of a budget search and/or the loss curve of ``--distill``, as one PNG
(matplotlib, from the ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path

from onnx_lowrank.output.report import INT8_SUFFIX, PROBE_LABEL, QUICK_SUFFIX, Report


def draw(report: Report, path: Path) -> None:
    """One panel per thing the run has to show: the budget search's frontier, the distillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [draw for draw, shown in ((_frontier, report.budget), (_distillation, (report.distill or {}).get("history")))
              if shown]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), dpi=120, squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        panel(report, ax)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _distillation(report: Report, axes) -> None:
    history = report.distill["history"]
    axes.plot([e["step"] for e in history], [e["validation_loss"] for e in history], marker="o", label="validation (outputs)")
    trained = [e for e in history if e["train_loss"] is not None]
    axes.plot([e["step"] for e in trained], [e["train_loss"] for e in trained], marker=".", label="training (outputs + hints, mean)")
    axes.axvline(report.distill["best_step"], color="grey", linestyle="--", label="kept (best validation)")
    axes.set_xlabel("step")
    axes.set_ylabel("distillation loss")
    axes.set_yscale("log")
    axes.set_title("onnx-lowrank distillation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def _frontier(report: Report, axes) -> None:
    points = [p for p in report.frontier if p.value is not None]
    for solver in dict.fromkeys(p.solver for p in points):
        chosen = [p for p in points if p.solver == solver]
        marker = ("o" if solver == PROBE_LABEL else "*" if "(distilled" in solver else "^" if solver.endswith(INT8_SUFFIX)
                  else "D" if solver.endswith(QUICK_SUFFIX) else "s")
        axes.scatter([p.theoretical_speedup for p in chosen], [p.value for p in chosen], marker=marker,
                     c=["tab:green" if p.met else "tab:red" for p in chosen],
                     label=solver, edgecolors="black", linewidths=0.5, zorder=3)
    axes.axhline(report.budget["limit"], color="grey", linestyle="--", label=report.budget["target"])
    axes.scatter([report.theoretical_speedup], [report.budget["measured"]], s=220, facecolors="none",
                 edgecolors="black", label="chosen", zorder=4)
    axes.set_xlabel("theoretical conv speedup (×)")
    axes.set_ylabel(report.budget["kind"])
    axes.set_title("onnx-lowrank budget search (green: met, red: missed)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
