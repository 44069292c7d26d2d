"""No import cycles among the modules of fastbirnn/triton (issue 21).

Read from the source, not from an import: every ``import`` statement counts, also one inside a
function (it closes a loop as soon as that function runs). A loop makes the import order
matter and leaves half-initialised modules to whoever comes first.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "fastbirnn.triton"
FOLDER = Path(__file__).resolve().parents[1] / "fastbirnn" / "triton"


def _module_name(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def import_graph(folder: Path = FOLDER) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (the package itself for names taken
    from its ``__init__``)."""
    modules = {_module_name(p): p for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this package
                    base = PACKAGE if node.level == 1 else PACKAGE.rsplit(".", node.level - 1)[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                submodules = [f"{source}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [source]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.multicta" in graph[f"{PACKAGE}.launcher"]
    assert f"{PACKAGE}.launcher" in graph[PACKAGE]


def test_no_import_cycles_in_fastbirnn_triton():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_a_function_level_import_closes_a_cycle(tmp_path):
    """The check itself: a loop through an import inside a function is found."""
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from fastbirnn.triton.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from fastbirnn.triton import a\n")
    (tmp_path / "c.py").write_text("import fastbirnn.triton.a\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]
