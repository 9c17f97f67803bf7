"""Turn the JSON written by ``tools/bench_paper.py`` into the Markdown tables of BENCHMARKS.md.

    python tools/render_paper.py /tmp/bench/demo.json /tmp/bench/lite0.json /tmp/bench/craft.json
"""

from __future__ import annotations

import json
import sys

import numpy as np


def _rows(data: dict, config: str) -> dict[float, dict]:
    return {row["speedup"]: row for row in data["rows"] if row["config"] == config and "infeasible" not in row}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def single_layer(data: dict) -> list[str]:
    linear, nonlinear = _rows(data, "linear"), _rows(data, "nonlinear")
    lines = ["| speedup | layers | mean response error linear | mean nonlinear | nonlinear lower | equal (no activation: both are PCA) | nonlinear higher |",
             "|---|---|---|---|---|---|---|"]
    for speedup in sorted(set(linear) & set(nonlinear)):
        pairs = [(a["response_error"], b["response_error"]) for a, b in
                 zip(linear[speedup]["layers"], nonlinear[speedup]["layers"])
                 if a["response_error"] is not None and b["response_error"] is not None]
        lin, non = np.array(pairs).T
        equal = np.abs(non - lin) <= 1e-3 * lin
        lines.append(f"| {speedup:g}× | {len(pairs)} | {lin.mean():.4f} | {non.mean():.4f} | "
                     f"{int(np.sum((non < lin) & ~equal))} | {int(np.sum(equal))} | {int(np.sum((non > lin) & ~equal))} |")
    return lines


def consecutive(data: dict) -> list[str]:
    symmetric, asymmetric = _rows(data, "nonlinear"), _rows(data, "asymmetric")
    lines = ["| speedup | layer | error symmetric (nonlinear) | error asymmetric |", "|---|---|---|---|"]
    for speedup in sorted(set(symmetric) & set(asymmetric)):
        sym, asym = symmetric[speedup], asymmetric[speedup]
        if "first_layers_error" not in sym:
            continue
        for position, (name, error) in enumerate(sym["first_layers_error"].items(), 1):
            lines.append(f"| {speedup:g}× | {position}: {sym['first_layers'][position - 1]} | {error:.4f} | "
                         f"{asym['first_layers_error'].get(name, float('nan')):.4f} |")
    return lines


def whole_model(data: dict) -> list[str]:
    lines = ["| speedup | config | theor. conv | output rel. err | fidelity | latency orig → opt ms | measured speedup | run s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        if "infeasible" in row:
            lines.append(f"| {row['speedup']:g}× | {row['config']} | infeasible: {row['infeasible']} | | | | | |")
            continue
        latency = row["latency_ms"] or {}
        lines.append(f"| {row['speedup']:g}× | {row['config']} | {row['theoretical_speedup']:.2f}× | "
                     f"{row['output_rel_error']:.4f} | {_fidelity(row)} | {_fmt(latency.get('original'), 2)} → "
                     f"{_fmt(latency.get('optimized'), 2)} | {_fmt(row['measured_speedup'], 2)}× | {row['run_s']:.0f} |")
    return lines


def _fidelity(row: dict) -> str:
    parts = []
    if row["accuracy"][0] is not None:
        parts.append(f"acc {_pct(row['accuracy'][0])} → {_pct(row['accuracy'][1])}")
    elif row.get("eval_top1_agreement") is not None:
        parts.append(f"top-1 agree {_pct(row['eval_top1_agreement'])}")
    elif row.get("top1_agreement") is not None and "text_iou" not in row:
        parts.append(f"top-1 agree {_pct(row['top1_agreement'])}")
    if "text_iou" in row:
        parts.append(f"score err {row['score_rel_error']:.3f}, text IoU {_pct(row['text_iou'])}")
    return ", ".join(parts) or "-"


def selected_ranks(data: dict) -> list[str]:
    uniform, selection = _rows(data, "asymmetric"), _rows(data, "selection")
    lines = []
    for speedup in sorted(set(uniform) & set(selection)):
        lines += ["", f"{speedup:g}×: rank (energy kept) per decomposed layer, uniform vs selection", "",
                  "| layer | c→d k×k | uniform | selection |", "|---|---|---|---|"]
        for a, b in zip(uniform[speedup]["layers"], selection[speedup]["layers"]):
            if a["rank"] is None and b["rank"] is None:
                continue
            lines.append(f"| {a['name']} | {a['shape']} | {_rank(a)} | {_rank(b)} |")
    return lines


def _rank(layer: dict) -> str:
    return "-" if layer["rank"] is None else f"{layer['rank']} ({_pct(layer['energy'])})"


def _command(command: dict) -> str:
    parts = ["python tools/bench_paper.py", command["name"], command["model"]]
    for key, value in command.items():
        flag = "--" + key.replace("_", "-")
        if key in ("name", "model") or value in (None, [], False):
            continue
        if key == "speedups":
            parts.append(f"{flag} " + " ".join(f"{v:g}" for v in value))
        elif isinstance(value, list):
            parts += [f"{flag} {v}" for v in value]
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def main() -> None:
    for path in sys.argv[1:]:
        data = json.load(open(path))
        command = data["command"]
        print(f"### {data['name']}\n")
        print(f"Command: `{_command(command)}`\n")
        for title, table in (("1. Single layer, linear vs nonlinear (each layer solved from the original input)", single_layer),
                             ("2. First three decomposed layers in the finished model, symmetric vs asymmetric", consecutive),
                             ("3–4. Whole model: fidelity and latency", whole_model),
                             ("3. Ranks chosen: uniform vs energy selection (both asymmetric)", selected_ranks)):
            print(f"**{title}**\n")
            print("\n".join(table(data)))
            print()


if __name__ == "__main__":
    main()
