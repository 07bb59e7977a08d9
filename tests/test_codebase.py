"""Properties of the source tree itself: layering of the imports and the size of functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "heretic"
MAX_FUNCTION_LINES = 60

# The pipeline's layers, lowest first: a module imports (at module level) only from its own layer or
# lower ones; an import inside a function only keeps `heretic --help` from loading torch.
LAYERS = [
    ("heretic", "heretic.errors"),
    ("heretic.config",),
    ("heretic.prompts",),
    ("heretic.model",),
    ("heretic.directions",),
    ("heretic.ablation",),
    ("heretic.scoring",),
    ("heretic.ui",),
    ("heretic.search",),
    ("heretic.session", "heretic.verify"),
    ("heretic.export", "heretic.report", "heretic.chat", "heretic.demo"),
    ("heretic.choose", "heretic.evaluate", "heretic.parallel"),
    ("heretic.cli", "heretic.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index of the layer whose longest prefix matches `module`."""
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{module} is in no layer of tests/test_codebase.py"
    return rank


def is_module(name: str) -> bool:
    path = SOURCE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def module_level_imports(path: Path) -> list[str]:
    """The heretic modules a file imports outside functions (and outside `if TYPE_CHECKING:`)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names += [f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module for alias in node.names]
    return [name for name in names if name == "heretic" or name.startswith("heretic.")]


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of the heretic modules a file imports inside functions."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in top:
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module
                found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "heretic" or name.startswith("heretic.")]


SOURCES = sorted(SOURCE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(SOURCE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    importer = module_name(path)
    for imported in module_level_imports(path):
        assert layer_of(imported) <= layer_of(importer), f"{importer} imports the upper layer {imported}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(SOURCE)))
def test_imports_inside_functions_go_down_the_layers_too(path: Path) -> None:
    """An import inside a function only defers loading (torch, for `heretic --help`); it never reaches up a layer."""
    importer = module_name(path)
    for line, imported in function_level_imports(path):
        assert layer_of(imported) <= layer_of(importer), f"{importer}:{line} imports the upper layer {imported}"


def test_no_function_is_longer_than_60_lines() -> None:
    """From the `def` line to the last line of the body (decorators not counted)."""
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these functions: " + "; ".join(long)


def test_the_layers_name_every_module() -> None:
    for path in SOURCES:
        layer_of(module_name(path))
