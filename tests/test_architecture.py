"""The packages' layering, read from every import in the source (module level and inside functions):
a package imports only the packages below it, and the pure layers import no ONNX library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_lowrank"

# Lowest first: each may import the ones before it. "core" is the package's own top-level modules.
LAYERS = ["core", "solvers", "planning", "graph", "runtime", "methods", "measure", "quantize", "distill", "output",
          "pipeline", "cli"]
# Third-party imports a layer may add to those of the layers below it.
LIBRARIES = {"core": {"numpy"}, "solvers": {"scipy"}, "graph": {"onnx", "onnx_graphsurgeon"},
             "runtime": {"onnxruntime", "PIL"}, "distill": {"torch", "onnx2torch"}, "output": {"rich", "matplotlib"},
             "cli": {"typer", "rich"}}
ENTRY_POINTS = {"__init__.py", "__main__.py"}  # lazy doors to the pipeline and the CLI


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else "core"


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def allowed_libraries(layer: str) -> set[str]:
    allowed = set()
    for lower in LAYERS[:LAYERS.index(layer) + 1]:
        allowed |= LIBRARIES.get(lower, set())
    return allowed


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ENTRY_POINTS or p.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_a_module_imports_only_the_layers_below_it(path: Path) -> None:
    layer = layer_of(path)
    assert layer in LAYERS, f"{path}: a package outside the layering"
    for name in imports(path):
        top = name.split(".")[0]
        if top == "onnx_lowrank":
            parts = name.split(".")
            target = parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "core"
            assert LAYERS.index(target) <= LAYERS.index(layer), f"{path}: {layer} imports {name} ({target})"
        elif top in {"onnx", "onnx_graphsurgeon", "onnxruntime", "scipy", "PIL", "rich", "matplotlib", "typer",
                     "torch", "onnx2torch"}:
            assert top in allowed_libraries(layer), f"{path}: {layer} imports {name}"


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_a_method_is_named_only_in_its_registry() -> None:
    """The pipeline branches on what a method declares (registry.Method), never on its name."""
    from onnx_lowrank.registry import METHODS

    named = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in METHODS:
                named.setdefault(str(path.relative_to(PACKAGE)), []).append(node.value)
    # the default of the option, declared once in Options, is the only name left
    assert named == {"options.py": ["asymmetric"]}, named


def _cli_parameters() -> dict:
    import typer

    from onnx_lowrank.cli.app import app

    return {p.name: p for p in typer.main.get_command(app).params}


def test_every_option_is_a_cli_flag_with_its_declared_choices() -> None:
    """One declaration (a field of Options) is the library keyword and the CLI flag."""
    from dataclasses import fields

    from onnx_lowrank.options import Options, declaration
    from onnx_lowrank.registry import METHODS

    cli = _cli_parameters()
    for option in fields(Options):
        assert option.name in cli, f"{option.name} has no CLI flag"
        choices = declaration(option).check.choices
        if choices and not declaration(option).check.multiple:
            assert [c.value for c in cli[option.name].type_descriptor.annotation] == list(choices), option.name
    assert [c.value for c in cli["method"].type_descriptor.annotation] == list(METHODS)


def test_an_option_is_declared_in_one_place() -> None:
    """No function re-lists the options (a stage may take the few it needs): the library entries take them
    as **options, the CLI builds its flags from the declarations."""
    from dataclasses import fields

    from onnx_lowrank.options import Options

    names = {f.name for f in fields(Options)} - {"speedup"}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                declared = {a.arg for a in node.args.args + node.args.kwonlyargs} & names
                assert len(declared) < 6, f"{path.name}:{node.name} re-declares options {sorted(declared)}"


def test_every_path_parameter_says_what_the_run_does_to_its_file() -> None:
    from dataclasses import fields

    from onnx_lowrank.cli.app import CLI_ONLY
    from onnx_lowrank.options import Options, declaration

    for name, parameter in CLI_ONLY.items():
        if name in {"calib", "eval_data", "metric"} or "Path" in str(parameter.annotation):
            assert parameter.use is not None, name
    for option in fields(Options):
        check = declaration(option).check
        if check.cli_type.__name__ == "Path":
            assert check.use is not None, option.name


def test_no_function_is_over_60_lines() -> None:
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, long


def test_every_cli_flag_is_in_the_option_reference() -> None:
    reference = (PACKAGE.parent / "docs" / "options.md").read_text()
    for parameter in _cli_parameters().values():
        for flag in parameter.opts:
            if flag.startswith("--") and flag != "--help":
                assert re.search(rf"[`/ ]{re.escape(flag)}[` ,/]", reference), flag
