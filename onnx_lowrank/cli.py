"""``onnx-lowrank IN.onnx OUT.onnx --speedup S``: parses options, calls :func:`compress`, prints."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnx_lowrank.errors import InvalidOptionError, LowRankError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Make an ONNX CNN faster by low-rank decomposition of its convolutions.")
# Typer vendors click in recent releases; its usage errors all derive from this class.
_CLICK_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
stdout = Console()
stderr = Console(stderr=True)


class Preset(str, Enum):
    imagenet = "imagenet"
    tf = "tf"
    caffe = "caffe"
    raw = "raw"


class RichProgress:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(description, total=total)
        return lambda advance=1: self.progress.advance(task, advance)


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidOptionError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InvalidOptionError(f"--input-size takes HxW, e.g. 224x224, got {text!r}") from None
    if height < 1 or width < 1:
        raise InvalidOptionError(f"--input-size must be positive, got {text!r}")
    return height, width


def _names(values: List[str]) -> list[str]:
    return [name for value in values for name in value.split(",") if name]


def _selection(rank_selection: Optional[str], uniform: bool) -> Optional[str]:
    if uniform and rank_selection not in (None, "uniform"):
        raise InvalidOptionError(f"--uniform contradicts --rank-selection {rank_selection}", hint="give one of them")
    return "uniform" if uniform else rank_selection


@app.command()
def run(
    input_model: Path = typer.Argument(..., metavar="IN.onnx", help="Model to accelerate."),
    output_model: Path = typer.Argument(..., metavar="OUT.onnx", help="Where to write the faster model."),
    speedup: float = typer.Option(4.0, help="Target theoretical conv speedup (> 1)."),
    calib: Optional[str] = typer.Option(None, help="Image folder, .npy, .npz (keyed by input name) or "
                                                     "file.py:ReaderName; without it random inputs are used."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Labelled .npz (with 'labels') to measure "
                                                                  "fidelity and accuracy on."),
    preprocess: Preset = typer.Option(Preset.imagenet, help="Preprocessing of image folders."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean, e.g. 0.485,0.456,0.406 (after --scale)."),
    std: Optional[str] = typer.Option(None, help="Per-channel std, e.g. 0.229,0.224,0.225."),
    scale: Optional[float] = typer.Option(None, help="Pixel multiplier applied before mean/std."),
    bgr: Optional[bool] = typer.Option(None, "--bgr/--rgb", help="Channel order fed to the model."),
    input_size: Optional[str] = typer.Option(None, help="HxW to calibrate at when the model's is dynamic."),
    num_images: int = typer.Option(300, help="Calibration samples to use (capped at what there is)."),
    samples_per_image: int = typer.Option(32, help="Spatial positions sampled per image and layer."),
    seed: int = typer.Option(0, help="Seed for sampling and random inputs."),
    skip: List[str] = typer.Option([], help="Conv node name to leave alone (repeat, or comma-separate)."),
    rank_multiple: int = typer.Option(16, help="Round ranks to this multiple (1 disables)."),
    method: str = typer.Option("asymmetric", help="asymmetric (default: nonlinear + Eq. 12), asym3d (also split k x k "
                                                      "into k x 1 and 1 x k, paper 3.5), nonlinear, linear; data-free "
                                                      "baselines: jaderberg, svd, tucker2."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Ablation: solve every layer from the original "
                                                               "network's inputs, not the approximated ones."),
    rank_selection: Optional[str] = typer.Option(None, help="energy (Eq. 13-14; default for the data-driven "
                                                            "methods) or uniform (default for the baselines)."),
    uniform: bool = typer.Option(False, "--uniform", help="Same as --rank-selection uniform."),
    channel_speedup: Optional[float] = typer.Option(None, help="asym3d: the channel part's speedup (default "
                                                               "sqrt of --speedup); the spatial split does the rest."),
    channel_only: List[str] = typer.Option([], help="asym3d: conv to decompose by channels only, without the "
                                                    "k x 1 / 1 x k split (repeat, or comma-separate)."),
    report: Optional[Path] = typer.Option(None, help="Write the report as JSON here."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Measure latency original vs optimized."),
    providers: List[str] = typer.Option(["cpu"], help="Providers to benchmark: cpu, cuda."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads (0 = its default)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Analyse and print the plan; write nothing."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show tracebacks of internal errors."),
) -> None:
    from onnx_lowrank.api import RANDOM_CALIBRATION_WARNING, compress
    from onnx_lowrank.calibration import make_preprocess
    from onnx_lowrank.graph.io import check_output_path, save_model_atomic
    from onnx_lowrank.ranks import validate_speedup
    from onnx_lowrank.report import render

    try:
        validate_speedup(speedup)
        if not dry_run:
            check_output_path(input_model, output_model)
        if calib is None:
            stderr.print(f"[bold red]WARNING:[/] {RANDOM_CALIBRATION_WARNING}")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=stderr, transient=True) as bars:
            result = compress(
                input_model, speedup, calibration=calib, evaluation=eval_data, progress=RichProgress(bars),
                preprocess=make_preprocess(preprocess.value, _floats(mean, "--mean"), _floats(std, "--std"),
                                           scale, bgr),
                method=method, symmetric=symmetric, rank_selection=_selection(rank_selection, uniform),
                channel_speedup=channel_speedup, channel_only=tuple(_names(channel_only)),
                rank_multiple=rank_multiple, num_images=num_images,
                samples_per_image=samples_per_image, seed=seed, skip=tuple(_names(skip)),
                providers=tuple(_names(providers)), threads=threads, bench=bench, dry_run=dry_run,
                input_size=_size(input_size))
        if not dry_run:
            save_model_atomic(result.model, output_model)
        if report is not None:
            result.report.write_json(report)
    except LowRankError as exc:
        stderr.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted; nothing was written")
        raise typer.Exit(130)
    except Exception as exc:
        if verbose:
            raise
        stderr.print(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    render(result.report, stdout)
    for warning in result.report.warnings:
        stderr.print(f"[bold yellow]warning:[/] {warning}")
    if not dry_run:
        stdout.print(f"wrote {output_model}")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: usage errors, like every other error, are one line on stderr and a non-zero exit."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="onnx-lowrank", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        code = 130
    except _CLICK_ERROR as exc:
        stderr.print(f"error: {exc.format_message()} (see onnx-lowrank --help)", markup=False,
                     highlight=False, soft_wrap=True)
        code = exc.exit_code
    sys.exit(code or 0)
