"""The package's layers: no import from a higher layer, no circles, and no module or function too long to read.

The imports are read from the source with `ast` (every `import` and `from ... import`, at module level or inside
a function: a lazy import is still a dependency). Layers, lowest first, as the package docstring lists them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastcomposer"
LAYERS = ["floor", "inputs", "models", "pipeline", "identity", "generation", "evaluation", "ui", "commands"]
FLOOR = {"config", "messages", "downloads"}  # the shared floor: top-level modules every layer may use
FACADE = {"fastcomposer", "fastcomposer.__main__"}  # the public API and `python -m`: above every layer
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # the body: after the signature and the docstring


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("fastcomposer", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import batch` imports the module `batch`; `from .x import name` imports `x`
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `fastcomposer.pipeline.loading.x` -> the module part
                target = target.rpartition(".")[0]
            if target.startswith("fastcomposer") and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int | None:
    """The layer index of a module, None for the facade."""
    if module in FACADE:
        return None
    part = module.split(".")[1]
    return 0 if part in FLOOR else LAYERS.index(part)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """"a -> b" for every import of a higher layer, or of the facade (which imports everything lazily)."""
    bad = []
    for module, targets in graph.items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and (there is None or there > here):
                bad.append(f"{module} ({LAYERS[here]}) -> {target} ({'facade' if there is None else LAYERS[there]})")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def test_every_sub_package_is_a_known_layer(graph):
    for module in graph:
        if module not in FACADE:
            part = module.split(".")[1]
            assert part in FLOOR or part in LAYERS, f"{module} is in no layer; add it to LAYERS or FLOOR"


def test_no_module_imports_a_higher_layer(graph):
    assert upward_imports(graph) == []


def test_no_circles(graph):
    assert circles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    """The two checks above on a made-up graph that breaks both rules: they must say so."""
    bad = {
        "fastcomposer.inputs.images": {"fastcomposer.generation.run"},  # inputs -> generation: upward
        "fastcomposer.generation.run": {"fastcomposer.generation.sweep"},
        "fastcomposer.generation.sweep": {"fastcomposer.generation.run"},  # a circle
        "fastcomposer.models.lora": {"fastcomposer"},  # the facade
    }
    assert upward_imports(bad) == [
        "fastcomposer.inputs.images (inputs) -> fastcomposer.generation.run (generation)",
        "fastcomposer.models.lora (models) -> fastcomposer (facade)",
    ]
    assert circles(bad) == [["fastcomposer.generation.run", "fastcomposer.generation.sweep"]]


def test_relative_imports_resolve_to_modules(graph):
    """Spot checks that the import reader resolves `from ..x import y` and `from . import m` as Python does."""
    assert "fastcomposer.pipeline.pipeline_fastcomposer" in graph["fastcomposer.pipeline.loading"]
    assert "fastcomposer.models.lora" in graph["fastcomposer.pipeline.loading"]
    assert {"fastcomposer.commands.batch", "fastcomposer.commands.generate"} <= graph["fastcomposer.commands.main"]


def test_modules_and_functions_stay_readable():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
                    body = body[1:]  # the docstring
                lines = node.end_lineno - body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {lines} lines")
    assert too_long == []


def test_old_module_paths_import_as_their_new_homes():
    import importlib

    import fastcomposer

    for old, new in fastcomposer.MOVED.items():
        assert importlib.import_module(f"fastcomposer.{old}") is importlib.import_module(f"fastcomposer.{new}")
    from fastcomposer.faces import FaceCropper
    from fastcomposer.lora import apply_loras

    from fastcomposer.generation import generate
    from fastcomposer.pipeline import FastComposerPipeline

    assert FaceCropper.__module__ == "fastcomposer.inputs.faces"
    assert generate.__module__ == "fastcomposer.generation.run"
    assert apply_loras.__module__ == "fastcomposer.models.lora"
    assert FastComposerPipeline.__module__ == "fastcomposer.pipeline.pipeline_fastcomposer"
    lora = importlib.import_module("fastcomposer.lora")
    assert lora.__spec__.name == "fastcomposer.models.lora", "the module keeps its own spec"
