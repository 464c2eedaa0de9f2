"""The package's layers only point down, and no two of its modules import each other (directly or in a ring).

Bottom to top: `errors.py` and `files.py`, then `data/` and `models/` (peers that never import each other),
`evaluation/`, `train/`, `recipe/`, `run/`. Every import statement counts, including those inside functions, since
an import that only runs later still ties the lower layer to the upper one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sftkey_trl

PACKAGE = Path(sftkey_trl.__file__).parent

# The first part of a module's name below the package -> its layer; a higher number is a higher layer.
RANKS = {
    "__init__": 0,
    "errors": 0,
    "files": 0,
    "data": 1,
    "models": 1,
    "evaluation": 2,
    "train": 3,
    "recipe": 4,
    "run": 5,
    "__main__": 6,  # `python -m sftkey_trl`: the command, above everything
}
# Layers of the same rank that still must not import each other.
APART = {frozenset({"data", "models"})}


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name (`pkg.data.loading`; a package by its folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every import of one of `modules` anywhere in the file, relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add((node.lineno, submodule if submodule in modules else base))
    return sorted((line, target) for line, target in found if target in modules and target != name)


def layer_problems(root: Path) -> list[str]:
    """One readable line per upward import (or import between apart peers) and per import cycle in the package."""
    modules = module_names(root)

    def layer(name: str) -> str:
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in RANKS, f"{name} is in no known layer; add it to RANKS"
        return parts[1] if len(parts) > 1 else "__init__"

    def shown(layer: str) -> str:
        return f"{layer}/" if (root / layer).is_dir() else f"{layer}.py"

    graph: dict[str, set[str]] = {name: set() for name in modules}
    problems = []
    for name, path in modules.items():
        for line, target in imports_of(name, path, modules):
            graph[name].add(target)
            low, high = layer(name), layer(target)
            where = f"{path.relative_to(root.parent)}:{line} imports {target}"
            if RANKS[high] > RANKS[low]:
                problems.append(f"{where}: {shown(high)} is above {shown(low)}")
            elif frozenset({low, high}) in APART:
                problems.append(f"{where}: {shown(low)} and {shown(high)} must not import each other")
    for ring, group in cycles(graph):
        others = sorted(group - set(ring))
        rest = f" (its group also holds {', '.join(others)})" if others else ""
        problems.append(f"import cycle: {' -> '.join(ring)}{rest}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """(ring, group) per group of more than one module that import each other: a shortest ring through the group's
    first module (repeated at the end), and the whole group (its strongly connected component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(set(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(ring_in(group, graph), group) for group in groups]


def ring_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest ring through the group's first module (breadth-first within the group)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no ring in a strongly connected group: {sorted(group)}")


def test_layers_only_point_down():
    """No module imports a higher layer (or its apart peer), and no modules import each other in a ring."""
    problems = layer_problems(PACKAGE)
    assert not problems, "layers must only point down:\n" + "\n".join(problems)


def test_layer_check_reports_upward_imports_and_cycles(tmp_path):
    """A synthetic package with an upward import inside a function, a peer import and two rings: all are reported."""
    files = {
        "__init__.py": "",
        "errors.py": "def fail():\n    from pkg.run import cli\n",
        "files.py": "",
        "data/__init__.py": "",
        "data/loading.py": "from ..models import tiny\nfrom . import masks\n",
        "data/masks.py": "def f():\n    import pkg.data.loading\n",
        "models/__init__.py": "",
        "models/tiny.py": "from pkg import errors, files\n",
        "evaluation/__init__.py": "",
        "evaluation/answers.py": "from pkg.train.steps import x\n",
        "run/__init__.py": "",
        "run/cli.py": "",
        "train/__init__.py": "",
        "train/steps.py": "from ..evaluation import answers\n",
    }
    for relative, text in files.items():
        (tmp_path / "pkg" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / relative).write_text(text)
    assert layer_problems(tmp_path / "pkg") == [
        "pkg/data/loading.py:1 imports pkg.models.tiny: data/ and models/ must not import each other",
        "pkg/errors.py:2 imports pkg.run.cli: run/ is above errors.py",
        "pkg/evaluation/answers.py:1 imports pkg.train.steps: train/ is above evaluation/",
        "import cycle: pkg.data.loading -> pkg.data.masks -> pkg.data.loading",
        "import cycle: pkg.evaluation.answers -> pkg.train.steps -> pkg.evaluation.answers",
    ]
