"""``onnx-lowrank IN.onnx OUT.onnx --speedup S``: parses options, calls :func:`compress`, writes, prints.

Exit codes: 0 done, 2 bad input (one ``error:`` line), 130/143 interrupted by SIGINT/SIGTERM
(nothing written), 3 internal error (a bug to report).
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from onnx_lowrank import __version__
from onnx_lowrank.cli.console import (
    Interrupted,
    Signals,
    configure_logging,
    one_line,
    print_quietly_on_broken_pipe,
    progress_sink,
    stderr,
    stdout,
    tell,
)
from onnx_lowrank.errors import InvalidOptionError, LowRankError
from onnx_lowrank.registry import METHODS

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Make an ONNX CNN faster by low-rank decomposition of its convolutions.")

# Typer vendors click in recent releases; its usage errors all derive from this class.
_CLICK_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
log = logging.getLogger("onnx_lowrank")

EXIT_BAD_INPUT, EXIT_INTERNAL = 2, 3


class Preset(str, Enum):
    imagenet = "imagenet"
    tf = "tf"
    caffe = "caffe"
    raw = "raw"


Method = Enum("Method", {name: name for name in METHODS}, type=str)  # the choices of --method, from the registry


class RankSelection(str, Enum):
    energy = "energy"
    sensitivity = "sensitivity"
    uniform = "uniform"


class Objective(str, Enum):
    flops = "flops"
    latency = "latency"


class Quantization(str, Enum):
    int8 = "int8"


class Int8Calibration(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


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


def _selection(rank_selection: Optional[RankSelection], uniform: bool) -> Optional[str]:
    chosen = rank_selection.value if rank_selection is not None else None
    if uniform and chosen not in (None, "uniform"):
        raise InvalidOptionError(f"--uniform contradicts --rank-selection {chosen}", hint="give one of them")
    return "uniform" if uniform else chosen


def _budget(max_error, min_agreement, max_drop, metric, min_metric, speedup, plot):
    """The accuracy budget asked for, if any: exactly one, and then --speedup only as the search's start."""
    from onnx_lowrank.pipeline.budget import Budget

    given = {"--max-error": max_error, "--min-agreement": min_agreement, "--max-drop": max_drop, "--metric": metric}
    chosen = [flag for flag, value in given.items() if value is not None]
    if len(chosen) > 1:
        raise InvalidOptionError(f"give one budget, not {' and '.join(chosen)}")
    if (metric is None) != (min_metric is None):
        raise InvalidOptionError("--metric and --min-metric go together", hint="give both, or neither")
    if plot is not None:
        if not chosen:
            raise InvalidOptionError("--plot draws the frontier of a budget search", hint="give a budget too")
        if importlib.util.find_spec("matplotlib") is None:
            raise InvalidOptionError("--plot needs matplotlib", hint="pip install 'onnx-lowrank[plots]'")
    if not chosen:
        return None
    if metric is not None:
        return Budget.from_file(metric, min_metric)
    kind = {"--max-error": "error", "--min-agreement": "agreement", "--max-drop": "drop"}[chosen[0]]
    return Budget(kind, given[chosen[0]])


def _show_version(value: bool) -> None:
    if value:
        print(f"onnx-lowrank {__version__}")
        raise typer.Exit(0)


DATA = "Data"


PLAN = "Plan and method"


BUDGET = "Accuracy budget (instead of --speedup)"


QUANTIZE = "INT8 on top"


RUN = "Measurement and output"


FORMS = "an image folder, a .npy file, an .npz keyed by input name (optional 'labels'), or file.py:ReaderName"


@app.command()
def run(
    input_model: Path = typer.Argument(..., metavar="IN.onnx", help="Model to accelerate."),
    output_model: Path = typer.Argument(..., metavar="OUT.onnx", help="Where to write the faster model."),
    speedup: Optional[float] = typer.Option(None, help="Target theoretical speedup of the decomposed layers (> 1; default 4), or, with "
                                            "a budget, where the search starts (default 2).", rich_help_panel=PLAN),
    max_error: Optional[float] = typer.Option(None, help="Budget: the fastest plan whose relative output error on "
                                              "held-out data is at most this.", rich_help_panel=BUDGET),
    min_agreement: Optional[float] = typer.Option(None, help="Budget (classifiers): top-1 agreement with the "
                                                  "original of at least this fraction, e.g. 0.99.",
                                                  rich_help_panel=BUDGET),
    max_drop: Optional[float] = typer.Option(None, help="Budget: accuracy loss of at most this many points "
                                             "(needs labels).", rich_help_panel=BUDGET),
    metric: Optional[str] = typer.Option(None, metavar="FILE.py:FN", help="Budget: your fn(original_outputs, "
                                         "candidate_outputs, labels) -> float (higher is better; outputs are "
                                         "dicts by output name), with --min-metric.", rich_help_panel=BUDGET),
    min_metric: Optional[float] = typer.Option(None, help="The least value of --metric to accept.",
                                               rich_help_panel=BUDGET),
    plot: Optional[Path] = typer.Option(None, help="Budget search: draw the explored frontier to this PNG "
                                        "(pip install 'onnx-lowrank\\[plots]').", rich_help_panel=BUDGET),
    calib: Optional[str] = typer.Option(None, help=f"Calibration data: {FORMS}; without it random inputs are "
                                                   "used.", rich_help_panel=DATA),
    eval_data: Optional[str] = typer.Option(None, "--eval", help=f"Data to measure fidelity on instead of the "
                                            f"held-out calibration samples: {FORMS}. With labels (class indices) "
                                            "accuracy is measured too.", rich_help_panel=DATA),
    preprocess: Preset = typer.Option(Preset.imagenet, help="Preprocessing of image folders.", rich_help_panel=DATA),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean, e.g. 0.485,0.456,0.406 (after --scale).",
                                       rich_help_panel=DATA),
    std: Optional[str] = typer.Option(None, help="Per-channel std, e.g. 0.229,0.224,0.225.", rich_help_panel=DATA),
    scale: Optional[float] = typer.Option(None, help="Pixel multiplier applied before mean/std.", rich_help_panel=DATA),
    bgr: Optional[bool] = typer.Option(None, "--bgr/--rgb", help="Channel order fed to the model.",
                                       rich_help_panel=DATA),
    input_size: Optional[str] = typer.Option(None, help="HxW to calibrate at when the model's is dynamic.",
                                             rich_help_panel=DATA),
    num_images: int = typer.Option(300, help="Calibration samples to use (capped at what there is).",
                                   rich_help_panel=DATA),
    samples_per_image: Optional[int] = typer.Option(None, help="Spatial positions sampled per image, the same "
                                                    "for every layer (default: sized per layer, at least 40 "
                                                    "samples per channel where the data allows).",
                                                    rich_help_panel=DATA),
    sample_memory: int = typer.Option(2048, metavar="MB", help="Bound on the memory of all sampled responses.",
                                      rich_help_panel=DATA),
    seed: int = typer.Option(0, help="Seed for sampling and random inputs.", rich_help_panel=DATA),
    augment: int = typer.Option(0, metavar="VIEWS", help="Image folders: calibrate on this many views of each "
                                "calibration picture (itself, mirrored, random 80-100 % crops; 0 = off).",
                                rich_help_panel=DATA),
    method: Method = typer.Option(Method.asymmetric, help="asymmetric (default: nonlinear + Eq. 12), asym3d (also "
                                  "split k x k into k x 1 and 1 x k, paper 3.5), nonlinear, linear; data-free "
                                  "baselines: jaderberg, svd, tucker2.", rich_help_panel=PLAN),
    skip: List[str] = typer.Option([], help="Layer (node) name to leave alone (repeat; a value naming no layer is "
                                            "read as comma-separated names).", rich_help_panel=PLAN),
    ops: List[str] = typer.Option(["conv,transpose,dense"], metavar="[conv|transpose|dense]", help="Kinds of layer "
                                  "to decompose (repeat, or comma-separate): conv (1-, 2-, 3-D Conv), transpose "
                                  "(ConvTranspose), dense (Gemm, MatMul by a constant). --speedup counts their "
                                  "compute.", rich_help_panel=PLAN),
    rank_multiple: int = typer.Option(16, help="Round ranks to this multiple (1 disables).", rich_help_panel=PLAN),
    symmetric: bool = typer.Option(False, "--symmetric", help="Ablation: solve every layer from the original "
                                   "network's inputs, not the approximated ones.", rich_help_panel=PLAN),
    rank_selection: Optional[RankSelection] = typer.Option(None, help="energy (Eq. 13-14; default for the "
                                                           "data-driven methods), sensitivity (measured end-to-end "
                                                           "loss per layer and rank; data-driven methods) or uniform "
                                                           "(default for the baselines).", rich_help_panel=PLAN),
    uniform: bool = typer.Option(False, "--uniform", help="Same as --rank-selection uniform.", rich_help_panel=PLAN),
    channel_speedup: Optional[float] = typer.Option(None, help="asym3d: the channel part's speedup (default "
                                                    "sqrt of --speedup, more where the split cannot make up the "
                                                    "rest); the spatial split does the rest.",
                                                    rich_help_panel=PLAN),
    channel_only: List[str] = typer.Option([], help="asym3d: conv to decompose by channels only, without the "
                                           "k x 1 / 1 x k split (repeat, as --skip).", rich_help_panel=PLAN),
    quantize: Optional[Quantization] = typer.Option(None, help="int8: then quantize the low-rank model with "
                                                    "onnxruntime's static quantizer (QDQ, per-channel weights, the "
                                                    "calibration data), nodes that cost more than --int8-tolerance "
                                                    "kept in float; the report compares original, low-rank, "
                                                    "low-rank + int8 and int8 alone.", rich_help_panel=QUANTIZE),
    int8_calibration: Int8Calibration = typer.Option(Int8Calibration.minmax, help="How INT8 activation ranges are "
                                                     "calibrated.", rich_help_panel=QUANTIZE),
    int8_tolerance: float = typer.Option(0.05, help="What INT8 may add to the relative output error on held-out "
                                         "data; nodes that cost more are kept in float, and if none can be, the "
                                         "float model is written. With an accuracy budget, the budget decides.",
                                         rich_help_panel=QUANTIZE),
    objective: Objective = typer.Option(Objective.flops, help="What --speedup counts: conv FLOPs, or conv latency "
                                        "measured on the first --providers entry installed here (each layer's candidate forms "
                                        "timed alone at --bench-batch; channel methods).", rich_help_panel=PLAN),
    latency_cache: Optional[Path] = typer.Option(None, help="--objective latency: keep the layer timings in this "
                                                 "JSON file, so the next run on this machine reuses them.",
                                                 rich_help_panel=PLAN),
    report: Optional[Path] = typer.Option(None, help="Write the report as JSON here.", rich_help_panel=RUN),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Measure latency original vs optimized.",
                               rich_help_panel=RUN),
    providers: List[str] = typer.Option(["cpu"], metavar="[cpu|cuda|tensorrt|openvino]", help="Provider to benchmark (repeat, or "
                                        "comma-separate).", rich_help_panel=RUN),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads (0 = its default).", rich_help_panel=RUN),
    bench_batch: int = typer.Option(1, help="Batch size latency is measured at (and planned at, with --objective "
                                    "latency).", rich_help_panel=RUN),
    dry_run: bool = typer.Option(False, "--dry-run", help="Analyse and print the plan; write no model.",
                                 rich_help_panel=RUN),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Print errors only.", rich_help_panel=RUN),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug messages, and the traceback of an "
                                 "internal error.", rich_help_panel=RUN),
    log_file: Optional[Path] = typer.Option(None, help="Also append every message, debug included, to this file.",
                                            rich_help_panel=RUN),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    code = 0
    with Signals() as signals:
        try:
            from onnx_lowrank.output.report import render
            from onnx_lowrank.output.staging import Staging, check_outputs
            from onnx_lowrank.pipeline.compress import compress
            from onnx_lowrank.runtime.images import make_preprocess

            budget = _budget(max_error, min_agreement, max_drop, metric, min_metric, speedup, plot)
            paths = check_outputs(input_model, None if dry_run else output_model, report, log_file,
                                  data=(calib, eval_data), plot=plot, latency_cache=latency_cache)
            configure_logging(quiet, verbose, log_file)
            options = dict(
                calibration=calib, evaluation=eval_data,
                preprocess=make_preprocess(preprocess.value, _floats(mean, "--mean"), _floats(std, "--std"),
                                           scale, bgr),
                method=method.value, symmetric=symmetric, rank_selection=_selection(rank_selection, uniform),
                channel_speedup=channel_speedup, channel_only=channel_only, rank_multiple=rank_multiple,
                num_images=num_images, samples_per_image=samples_per_image, sample_memory_mb=sample_memory,
                seed=seed, skip=skip, ops=[o for value in ops for o in value.split(",") if o], providers=[p for value in providers for p in value.split(",") if p],
                threads=threads, bench=bench, dry_run=dry_run, input_size=_size(input_size), augment=augment,
                quantize=None if quantize is None else quantize.value, int8_calibration=int8_calibration.value,
                int8_tolerance=int8_tolerance,
                objective=objective.value, latency_cache=latency_cache, bench_batch=bench_batch)
            with progress_sink(quiet) as progress:
                if budget is None:
                    result = compress(input_model, 4.0 if speedup is None else speedup, progress=progress, **options)
                else:
                    from onnx_lowrank.pipeline.search import compress_to_budget

                    result = compress_to_budget(input_model, budget, progress=progress,
                                                **({} if speedup is None else {"speedup": speedup}), **options)
            with Staging(paths) as staging:
                if result.model is not None:
                    staging.model(result.model)
                    result.report.files["output"] = staging.describe_model()
                if paths.report is not None:
                    staging.text(paths.report, result.report.to_json())
                if paths.plot is not None:
                    from onnx_lowrank.output.plot import draw_frontier

                    staging.file(paths.plot, lambda path: draw_frontier(result.report, path))
                signals.commit(staging)
            # From the commit on the run has succeeded: a reader gone from stdout does not change that.
            if not quiet:
                print_quietly_on_broken_pipe(lambda: render(result.report, stdout))
            if result.model is not None:
                log.info("wrote %s", output_model)
        except LowRankError as exc:
            tell(f"error: {one_line(str(exc))}")
            code = EXIT_BAD_INPUT
        except MemoryError:
            tell("error: out of memory (hint: lower --num-images, --samples-per-image or --input-size)")
            code = EXIT_BAD_INPUT
        except (Interrupted, KeyboardInterrupt) as exc:
            tell("interrupted; nothing was written")
            code = getattr(exc, "exit_code", 128 + signal.SIGINT)
        except Exception as exc:
            if verbose:
                raise
            log.debug("internal error", exc_info=True)  # the traceback, for the --log-file
            tell(f"internal error: {type(exc).__name__}: {one_line(str(exc))} (a bug: please report it; "
                  "-v shows the traceback)")
            code = EXIT_INTERNAL
    if code:
        raise typer.Exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: usage errors, like every other error, are one line on stderr and a non-zero exit."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="onnx-lowrank", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        code = 128 + signal.SIGINT
    except _CLICK_ERROR as exc:
        stderr.print(f"error: {exc.format_message()} (see onnx-lowrank --help)", markup=False,
                     highlight=False, soft_wrap=True)
        code = exc.exit_code
    sys.exit(code or 0)
