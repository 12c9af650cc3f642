"""The package stays readable: no source file over 400 lines (issue 15; split along real seams)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_no_package_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "modula_mhc").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along one idea per module): {long}"


# hooks that torch or pytest call by name, never the code itself
CALLED_BY_FRAMEWORKS = {"extra_repr", "one_thread", "_force_triton", "fresh_library", "_interpreted_triton"}


def test_no_dead_code():
    """No function, method, class or property that nothing in the package, tests, examples,
    benchmarks or docs tooling uses (vulture, 60% confidence)."""
    vulture = pytest.importorskip("vulture")
    v = vulture.Vulture()
    v.scavenge([str(ROOT / d) for d in ("modula_mhc", "tests", "examples", "benchmarks", "docs/build_api.py")])
    dead = [f"{item.filename}:{item.first_lineno} {item.typ} {item.name}" for item in v.get_unused_code(min_confidence=60)
            if item.typ in ("function", "method", "class", "property") and item.name not in CALLED_BY_FRAMEWORKS]
    assert not dead, "unused code:\n" + "\n".join(dead)


# ------------------------------------------------------------------------------------ one source per policy
MANIFOLD_NAMES = {"euclidean", "stiefel", "dgram", "oblique", "sphere", "birkhoff", None}
#: examples that show a user's own loop around mm.adapt (bring your own model: that is their point)
OWN_LOOP_EXAMPLES = {"adapt_gpt2.py", "adapt_models.py"}


def _python_files(*folders):
    return [p for d in folders for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]


def _is_manifold_tuple(node) -> bool:
    return isinstance(node, ast.Tuple) and len(node.elts) >= 2 and all(
        isinstance(e, ast.Constant) and e.value in MANIFOLD_NAMES for e in node.elts)


def test_the_manifold_preset_table_exists_once():
    """A dict whose values are (attention, MLP, …) manifold-name tuples is a preset table: only
    optim/presets.py holds one; everything else reads optim.PRESETS."""
    owner = ROOT / "modula_mhc" / "optim" / "presets.py"
    tables = []
    for path in _python_files("modula_mhc", "examples", "benchmarks", "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and sum(map(_is_manifold_tuple, node.values)) >= 2:
                tables.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert [t for t in tables if not t.startswith(str(owner.relative_to(ROOT)))] == [], tables
    assert any(t.startswith(str(owner.relative_to(ROOT))) for t in tables)


def test_examples_train_with_the_library_loop():
    """No example steps an optimizer itself: they go through modula_mhc.loop.train_steps (directly
    or through examples/_common.run), as `modula-mhc train` does."""
    own = [f"{p.name}:{n.lineno}" for p in _python_files("examples") if p.name not in OWN_LOOP_EXAMPLES
           for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("backward", "step")
           and not n.args]
    assert not own, f"examples with their own training loop: {own}"
