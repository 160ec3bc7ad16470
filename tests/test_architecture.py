"""The package's import structure: stages over shared layers, nothing importing upwards, no
circle between modules. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "sedsft"

# bottom to top; a part may import its own layer and those below it
LAYERS = (
    {"sedsft", "utils", "metrics", "losses"},  # shared: no knowledge of data, models or stages
    {"data"},
    {"models"},
    {"checkpoints", "model_paths"},
    {"evaluation"},
    {"sft", "rl"},  # the stages
    {"pipeline"},  # runs the stages
    {"reporting"},  # reads what the pipeline wrote
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imports() -> dict[str, frozenset[str]]:
    """Each module of the package: the package's modules it imports (``from a import b``
    counts ``a.b`` when that is a module); parsed once for all the tests."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sedsft"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        out[name] = frozenset(m for m in found if m in files and m != name)
    return out


def part(module: str) -> str:
    """``sedsft.rl.training`` -> ``rl``; ``sedsft`` -> ``sedsft``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part(module) in names)


def test_every_part_of_the_package_has_a_layer():
    assert {part(m) for m in imports()} == set().union(*LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        f"{m} imports {d}" for m, deps in imports().items() for d in deps if layer(d) > layer(m)
    )
    assert upward == []


def test_no_import_circle_between_modules():
    graph = imports()
    done: set[str] = set()
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                circles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert circles == []
