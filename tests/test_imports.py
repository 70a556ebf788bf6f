"""The package's import graph: no cycle (function-level imports included) and no import of
the ``beam``/``serving`` entry-point packages from ``muse_tf``'s library.

Edges come from the source (``ast``), not from importing: every ``import`` and
``from ... import`` anywhere in a module counts, except under ``if TYPE_CHECKING:`` (never
executed). ``from package import name`` is an edge to ``package.name`` when that is a module,
else to ``package`` (its ``__init__``).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("muse_tf", "beam", "serving")
#: Entry points of muse_tf that may drive the offline pipeline or the server.
ENTRY_POINTS = {"muse_tf.demo", "muse_tf.bench", "muse_tf.bench_scale"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in modules} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_detects_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_function_level_imports_are_edges():
    tree = ast.parse("def f():\n    from . import b\n    import muse_tf.c\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import muse_tf.d\n")
    found = _imports(tree, "muse_tf.pkg.a", is_package=False)
    assert {"muse_tf.pkg", "muse_tf.pkg.b", "muse_tf.c"} <= found
    assert "muse_tf.d" not in found


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_library_never_imports_beam_or_serving():
    offenders = {module: sorted(t for t in targets if t.split(".")[0] in ("beam", "serving"))
                 for module, targets in import_graph().items()
                 if module.split(".")[0] == "muse_tf" and module not in ENTRY_POINTS}
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, offenders
