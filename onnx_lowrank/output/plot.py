"""The frontier of a budget search as a PNG (matplotlib, from the ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path

from onnx_lowrank.output.report import INT8_SUFFIX, PROBE_LABEL, QUICK_SUFFIX, Report


def draw_frontier(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in report.frontier if p.value is not None]
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for solver in dict.fromkeys(p.solver for p in points):
        chosen = [p for p in points if p.solver == solver]
        marker = ("o" if solver == PROBE_LABEL else "^" if solver.endswith(INT8_SUFFIX)
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
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
