"""The package has no import cycles, function-local imports included (issue 15).

The graph is read from the source (every ``import`` / ``from`` statement anywhere in a file,
relative imports resolved), not from ``sys.modules``: an import hidden in a function body is a
dependency all the same. ``from pkg import name`` where ``name`` is a submodule is an edge to that
submodule; a plug-in package (one whose ``__init__`` discovers its folder with
``_plugins.export_subclasses`` or ``_plugins.discover``) imports every public module file in it.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "modula_mhc"
DISCOVERY_CALLS = {"export_subclasses", "discover_classes"}


def module_files(root: pathlib.Path, package: str) -> dict:
    """{dotted module name: path} for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module named by ``from <level dots><target> import …`` inside module ``name``."""
    if level == 0:
        return target or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _calls_discovery(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if called in DISCOVERY_CALLS:
                return True
    return False


def import_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict:
    """{module: set of package modules it imports}, from the AST of every file."""
    files = module_files(root, package)
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    deps.add(sub if sub in files else source)
        if is_package and _calls_discovery(tree):
            deps.update(m for m in files if m.rsplit(".", 1)[0] == name and not m.rsplit(".", 1)[1].startswith("_"))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict) -> list | None:
    """One cycle [a, b, …, a] of the directed graph, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
            elif colour[child] == GREY:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
    return None


def all_cycles(graph: dict) -> list:
    """One cycle per strongly connected component with more than one module."""
    cycles, remaining = [], {k: set(v) for k, v in graph.items()}
    while (cycle := find_cycle(remaining)) is not None:
        cycles.append(cycle)
        for node in cycle[:-1]:  # drop the component's edges found so far, look for others
            remaining[node] -= set(cycle)
    return cycles


def test_graph_sees_function_local_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.sub.b", "pkg.a", "pkg.sub.b"])


def test_no_import_cycles():
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles in the package:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)
