"""``onnx-lowrank IN.onnx OUT.onnx --speedup S``: parses options, calls :func:`compress`, writes, prints.

The command is built from declarations: each field of ``options.Options`` is a flag (its help,
choices and checks declared there), and the options only the command line has (how images are
read, the budget, the files it writes, how it talks) are declared once here, in ``CLI_ONLY``. A
path option says what the run does to its file, so the file-safety checks cover every one.

Exit codes: 0 done, 2 bad input (one ``error:`` line), 130/143 interrupted by SIGINT/SIGTERM
(nothing written), 3 internal error (a bug to report).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import signal
import sys
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

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
from onnx_lowrank.options import BUDGET, DATA, DISTILL, FORMS, PLAN, QUANTIZE, RUN, Options, declaration
from onnx_lowrank.userfiles import FileUse

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


def _show_version(value: bool) -> None:
    if value:
        print(f"onnx-lowrank {__version__}")
        raise typer.Exit(0)


@dataclass(frozen=True)
class CliOnly:
    """A parameter only the command line has (the library takes an object in its place, or none)."""

    annotation: Any
    info: Any  # typer.Argument(...) or typer.Option(...)
    use: FileUse | None = None  # a path: what the run does to it


def _opt(annotation, default, *decls, use: FileUse | None = None, **info) -> CliOnly:
    return CliOnly(annotation, typer.Option(default, *decls, **info), use)


# The library takes a model and data objects, a ``preprocess`` callable (``make_preprocess``) and a
# ``Budget``; it returns the report and the model rather than writing them; it logs to ``logging``.
CLI_ONLY: dict[str, CliOnly] = {
    "input_model": CliOnly(Path, typer.Argument(..., metavar="IN.onnx", help="Model to accelerate."), FileUse.READ),
    "output_model": CliOnly(Path, typer.Argument(..., metavar="OUT.onnx", help="Where to write the faster model."),
                            FileUse.WRITTEN),
    "max_error": _opt(Optional[float], None, help="Budget: the fastest plan whose relative output error on held-out "
                      "data (its worst output) is at most this.", rich_help_panel=BUDGET),
    "min_agreement": _opt(Optional[float], None, help="Budget (classifiers): top-1 agreement with the original of "
                          "at least this fraction, e.g. 0.99.", rich_help_panel=BUDGET),
    "max_drop": _opt(Optional[float], None, help="Budget: accuracy loss of at most this many points (needs "
                     "labels).", rich_help_panel=BUDGET),
    "metric": _opt(Optional[str], None, metavar="FILE.py:FN", use=FileUse.READ, help="Budget: your "
                   "fn(original_outputs, candidate_outputs, labels) -> float (higher is better; outputs are dicts by "
                   "output name), with --min-metric.", rich_help_panel=BUDGET),
    "min_metric": _opt(Optional[float], None, help="The least value of --metric to accept.", rich_help_panel=BUDGET),
    "plot": _opt(Optional[Path], None, use=FileUse.WRITTEN, help="Draw the budget search's frontier and/or the "
                 "--distill loss to this PNG (pip install 'onnx-lowrank\\[plots]').", rich_help_panel=BUDGET),
    "calib": _opt(Optional[str], None, use=FileUse.READ, help=f"Calibration data: {FORMS}; without it random "
                  "inputs are used.", rich_help_panel=DATA),
    "eval_data": _opt(Optional[str], None, "--eval", use=FileUse.READ, help=f"Data to measure fidelity on instead "
                      f"of the held-out calibration samples: {FORMS}. With labels (class indices) accuracy is "
                      "measured too.", rich_help_panel=DATA),
    "preprocess": _opt(Preset, Preset.imagenet, help="Preprocessing of image folders.", rich_help_panel=DATA),
    "mean": _opt(Optional[str], None, help="Per-channel mean, e.g. 0.485,0.456,0.406 (after --scale).",
                 rich_help_panel=DATA),
    "std": _opt(Optional[str], None, help="Per-channel std, e.g. 0.229,0.224,0.225.", rich_help_panel=DATA),
    "scale": _opt(Optional[float], None, help="Pixel multiplier applied before mean/std.", rich_help_panel=DATA),
    "bgr": _opt(Optional[bool], None, "--bgr/--rgb", help="Channel order fed to the model.", rich_help_panel=DATA),
    "uniform": _opt(bool, False, "--uniform", help="Same as --rank-selection uniform.", rich_help_panel=PLAN),
    "report": _opt(Optional[Path], None, use=FileUse.WRITTEN, help="Write the report as JSON here.",
                   rich_help_panel=RUN),
    "quiet": _opt(bool, False, "-q", "--quiet", help="Print errors only.", rich_help_panel=RUN),
    "verbose": _opt(bool, False, "-v", "--verbose", help="Debug messages, and the traceback of an internal "
                    "error.", rich_help_panel=RUN),
    "log_file": _opt(Optional[Path], None, use=FileUse.APPENDED, help="Also append every message, debug included, "
                     "to this file.", rich_help_panel=RUN),
    "version": _opt(bool, False, "--version", callback=_show_version, is_eager=True,
                    help="Print the version and exit."),
}


def _flag_of(name: str) -> str:
    if name in CLI_ONLY:
        decls = CLI_ONLY[name].info.param_decls
        return decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
    return declaration(next(f for f in fields(Options) if f.name == name)).flag or "--" + name.replace("_", "-")


def _declared_parameter(option_field) -> inspect.Parameter:
    """The typer parameter of an ``Options`` field, its default the declared one."""
    declared = declaration(option_field)
    check = declared.check
    dashed = option_field.name.replace("_", "-")
    if check.cli_type is bool:
        decls = [declared.flag or (f"--{dashed}/--no-{dashed}" if option_field.default else f"--{dashed}")]
    else:
        decls = [declared.flag] if declared.flag else []
    kind = check.cli_type
    if check.choices and not check.multiple:
        kind = Enum(option_field.name, {choice: choice for choice in check.choices}, type=str)
    metavar = declared.metavar or (f"[{'|'.join(check.choices)}]" if check.choices and check.multiple else None)
    default = None if declared.default_depends else option_field.default
    if isinstance(default, tuple):
        default = [",".join(default)] if default and check.choices else list(default) or None
    info = typer.Option(default, *decls, help=declared.help, rich_help_panel=declared.panel, metavar=metavar)
    annotation = List[kind] if check.multiple else Optional[kind]
    return inspect.Parameter(option_field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _signature() -> inspect.Signature:
    for name, parameter in CLI_ONLY.items():
        # By construction: a parameter that takes a path declares what the run does to it.
        if "Path" in str(parameter.annotation) and parameter.use is None:
            raise AssertionError(f"CLI parameter {name} takes a path and declares no FileUse")
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD if name.endswith("_model")
                                else inspect.Parameter.KEYWORD_ONLY, default=p.info, annotation=p.annotation)
              for name, p in CLI_ONLY.items()]
    params += [_declared_parameter(f) for f in fields(Options)]
    panels = [PLAN, BUDGET, DATA, DISTILL, QUANTIZE, RUN]
    # The panels in --help come in the order their first flag does.
    order = {p.name: (p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      panels.index(p.default.rich_help_panel) if p.default.rich_help_panel in panels else 0, i)
             for i, p in enumerate(params)}
    return inspect.Signature(sorted(params, key=lambda p: order[p.name]))


def _library_options(given: dict[str, Any]) -> dict[str, Any]:
    """The ``Options`` keywords the command line gave, in the library's form; the rest keep its defaults."""
    options = {}
    for option_field in fields(Options):
        value = given[option_field.name]
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        options[option_field.name] = declaration(option_field).check.from_cli(
            value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value)
    return options


def _path_options(given: dict[str, Any]):
    """Every path the user gave with what the run does to it, for ``output.staging.check_outputs``."""
    from onnx_lowrank.output.staging import PathOption

    uses = {name: p.use for name, p in CLI_ONLY.items() if not name.endswith("_model")}
    uses.update({f.name: declaration(f).check.use for f in fields(Options)})
    return [PathOption(_flag_of(name), given[name], use) for name, use in uses.items()
            if use is not None and given.get(name) is not None]


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InvalidOptionError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _with_uniform(options: dict[str, Any], uniform: bool) -> dict[str, Any]:
    chosen = options.get("rank_selection")
    if uniform and chosen not in (None, "uniform"):
        raise InvalidOptionError(f"--uniform contradicts --rank-selection {chosen}", hint="give one of them")
    return {**options, "rank_selection": "uniform"} if uniform else options


def _budget(given: dict[str, Any]):
    """The accuracy budget asked for, if any: exactly one, and then --speedup only as the search's start."""
    from onnx_lowrank.pipeline.budget import Budget

    limits = {"max_error": "error", "min_agreement": "agreement", "max_drop": "drop", "metric": "metric"}
    chosen = [name for name in limits if given[name] is not None]
    if len(chosen) > 1:
        raise InvalidOptionError(f"give one budget, not {' and '.join(_flag_of(n) for n in chosen)}")
    if (given["metric"] is None) != (given["min_metric"] is None):
        raise InvalidOptionError("--metric and --min-metric go together", hint="give both, or neither")
    if given["plot"] is not None:
        if not chosen and not given["distill"]:
            raise InvalidOptionError("--plot draws the frontier of a budget search or the loss of --distill",
                                     hint="give a budget or --distill too")
        if importlib.util.find_spec("matplotlib") is None:
            raise InvalidOptionError("--plot needs matplotlib", hint="pip install 'onnx-lowrank[plots]'")
    if not chosen:
        return None
    if chosen[0] == "metric":
        return Budget.from_file(given["metric"], given["min_metric"])
    return Budget(limits[chosen[0]], given[chosen[0]])


def _run(**given: Any) -> None:
    code = 0
    with Signals() as signals:
        try:
            code = _compress_and_write(given, signals)
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
            if given["verbose"]:
                raise
            log.debug("internal error", exc_info=True)  # the traceback, for the --log-file
            tell(f"internal error: {type(exc).__name__}: {one_line(str(exc))} (a bug: please report it; "
                 "-v shows the traceback)")
            code = EXIT_INTERNAL
    if code:
        raise typer.Exit(code)


def _compress_and_write(given: dict[str, Any], signals: Signals) -> int:
    from onnx_lowrank.output.report import render
    from onnx_lowrank.output.staging import Staging, check_outputs
    from onnx_lowrank.pipeline.compress import compress
    from onnx_lowrank.runtime.images import make_preprocess

    options = _with_uniform(_library_options(given), given["uniform"])
    budget = _budget(given)
    dry_run = options.get("dry_run", False)
    paths = check_outputs(given["input_model"], None if dry_run else given["output_model"], _path_options(given))
    configure_logging(given["quiet"], given["verbose"], paths.get("--log-file"))
    data = dict(calibration=given["calib"], evaluation=given["eval_data"],
                preprocess=make_preprocess(given["preprocess"].value, _floats(given["mean"], "--mean"),
                                           _floats(given["std"], "--std"), given["scale"], given["bgr"]))
    with progress_sink(given["quiet"]) as progress:
        if budget is None:
            result = compress(given["input_model"], progress=progress, **data, **options)
        else:
            from onnx_lowrank.pipeline.search import compress_to_budget

            result = compress_to_budget(given["input_model"], budget, progress=progress, **data, **options)
    with Staging(paths) as staging:
        if result.model is not None:
            staging.model(result.model)
            result.report.files["output"] = staging.describe_model()
        if paths.get("--report") is not None:
            staging.text(paths.get("--report"), result.report.to_json())
        if paths.get("--plot") is not None:
            from onnx_lowrank.output.plot import draw

            staging.file(paths.get("--plot"), lambda path: draw(result.report, path))
        signals.commit(staging)
    # From the commit on the run has succeeded: a reader gone from stdout does not change that.
    if not given["quiet"]:
        print_quietly_on_broken_pipe(lambda: render(result.report, stdout))
    if result.model is not None:
        log.info("wrote %s", given["output_model"])
    return 0


_run.__signature__ = _signature()
run = app.command(name="run")(_run)


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
