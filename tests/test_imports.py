"""The package's import graph: no import cycle, no import inside a function but of a heavy optional library, and
the package never imports the launch/ scripts."""

import ast
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# imported where they are needed, so that a stage process does not pay for them: plotting, TensorBoard, and the
# real datasets (torchvision)
LAZY = ("matplotlib", "torch.utils.tensorboard", "torchvision")


def _modules(root: str) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(os.path.join(root, "pipeline")):
        for name in files:
            if name.endswith(".py"):
                module = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def _targets(node: ast.AST, modules: dict) -> list[str]:
    """The package's modules an import statement loads (a name imported from a package may be its module)."""
    if isinstance(node, ast.ImportFrom) and node.module:
        named = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        return named or ([node.module] if node.module in modules else [])
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    return []


def import_graph(root: str = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the modules it imports when it is loaded, the imports made inside functions). Imports under
    `if TYPE_CHECKING:` are for annotations and load nothing."""
    modules = _modules(root)
    graph, inside = {}, []
    for module, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        graph[module] = {t for node in tree.body for t in _targets(node, modules) if t != module}
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                        if not all((name or "").startswith(LAZY) for name in names):
                            inside.append(f"{module}.{function.name} imports {', '.join(map(str, names))}")
    return graph, inside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_no_import_inside_a_function_but_a_heavy_optional_library():
    assert import_graph()[1] == []


def test_the_package_never_imports_the_launch_scripts():
    for path in _modules(ROOT).values():
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("launch"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("launch") for a in node.names), path


def test_the_finder_finds_a_cycle(tmp_path):
    """A cycle added on purpose (a module that imports one that imports it) is found, with its members."""
    package = tmp_path / "pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pipeline.b import thing\n")
    (package / "b.py").write_text("import torch\nfrom pipeline import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nfrom pipeline.a import x\nif TYPE_CHECKING:\n    from pipeline.d import y\n")
    (package / "d.py").write_text("def f():\n    from pipeline.c import z\n    import matplotlib\n")
    graph, inside = import_graph(str(tmp_path))
    assert cycles(graph) == [["pipeline.a", "pipeline.b", "pipeline.c"]]  # d: only under TYPE_CHECKING, or lazily
    assert inside == ["pipeline.d.f imports pipeline.c"]
