"""No import cycles between featurelens modules, lazy (function-level) imports included.

Every ``import featurelens...`` / ``from featurelens... import ...`` in every module under
``src/featurelens`` is an edge, wherever it stands (module level, inside a function, under
``if TYPE_CHECKING``). ``import featurelens`` and ``from featurelens import x`` import the
package's ``__init__``, which imports (nearly) everything: a submodule doing that closes a
cycle. ``__init__`` importing its own submodules is not a cycle by itself: importing a
submodule is an edge to that submodule only (its package is being initialised already).
"""

from __future__ import annotations

import ast
from pathlib import Path

import featurelens

PACKAGE = "featurelens"
ROOT = Path(featurelens.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    """``{dotted name: file}`` of every module and package of featurelens."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The featurelens modules that module ``name`` (file ``path``) imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            found.add(base)  # the module (or package __init__) named after "from"
            for alias in node.names:  # `from featurelens.app import server`: a submodule too
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
    unknown = found - set(modules)
    assert not unknown, f"{name} imports modules that do not exist: {sorted(unknown)}"
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path ``a -> b -> ... -> a``) per strongly connected component
    with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_cycle_in(graph, set(c)) for c in components]


def cycle_report(graph: dict[str, set[str]]) -> str:
    """One line per cycle: the shortest path, then every module caught in it."""
    lines = []
    for cycle in find_cycles(graph):
        members = {cycle[0]}
        for other in graph:  # every module both reachable from and reaching the cycle
            if _reaches(graph, cycle[0], other) and _reaches(graph, other, cycle[0]):
                members.add(other)
        lines.append(
            " -> ".join(cycle) + f"   (modules in the cycle: {', '.join(sorted(members))})"
        )
    return "\n".join(lines)


def _reaches(graph: dict[str, set[str]], a: str, b: str) -> bool:
    seen, todo = {a}, [a]
    while todo:
        for child in graph[todo.pop()]:
            if child == b:
                return True
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return False


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_checker_finds_cycles_and_only_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    two = find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}, "e": {"a", "c"}})
    assert sorted(two) == [["a", "b", "a"], ["c", "d", "c"]]


def test_the_graph_sees_every_kind_of_import(tmp_path: Path):
    pkg = tmp_path / PACKAGE
    (pkg / "app").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from featurelens.a import x\n")
    (pkg / "a.py").write_text("def f():\n    import featurelens\n")
    (pkg / "b.py").write_text("from featurelens import a\nfrom .app import server\n")
    (pkg / "app" / "__init__.py").write_text("")
    (pkg / "app" / "server.py").write_text("from ..a import x\nimport featurelens.app as app\n")
    modules = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(pkg).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {
        "featurelens": {"featurelens.a"},
        "featurelens.a": {"featurelens"},  # a function-level `import featurelens`
        "featurelens.app": set(),
        "featurelens.app.server": {"featurelens.a", "featurelens.app"},
        "featurelens.b": {"featurelens", "featurelens.a", "featurelens.app",
                          "featurelens.app.server"},
    }  # fmt: skip
    assert find_cycles(graph) == [["featurelens", "featurelens.a", "featurelens"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "featurelens.atlas" in graph and "featurelens.app.server" in graph
    assert not find_cycles(graph), "import cycles:\n" + cycle_report(graph)


def test_fingerprints_and_files_sit_at_the_bottom():
    graph = import_graph()
    bottom = {"featurelens._version", "featurelens.errors", "featurelens.files"}
    for name in bottom:
        assert graph[name] == set(), f"{name} imports {sorted(graph[name])}"
    assert graph["featurelens.data"] <= bottom
    assert graph["featurelens.fingerprint"] <= bottom | {"featurelens.data"}
