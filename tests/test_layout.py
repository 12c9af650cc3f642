"""The package stays readable: no source file over 400 lines (issue 15; split along real seams)."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_no_package_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "modula_mhc").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along one idea per module): {long}"


# hooks that torch or pytest call by name, never the code itself
CALLED_BY_FRAMEWORKS = {"extra_repr", "_one_thread", "_force_triton"}


def test_no_dead_code():
    """No function, method, class or property that nothing in the package, tests, examples,
    benchmarks or docs tooling uses (vulture, 60% confidence)."""
    vulture = pytest.importorskip("vulture")
    v = vulture.Vulture()
    v.scavenge([str(ROOT / d) for d in ("modula_mhc", "tests", "examples", "benchmarks", "docs/build_api.py")])
    dead = [f"{item.filename}:{item.first_lineno} {item.typ} {item.name}" for item in v.get_unused_code(min_confidence=60)
            if item.typ in ("function", "method", "class", "property") and item.name not in CALLED_BY_FRAMEWORKS]
    assert not dead, "unused code:\n" + "\n".join(dead)
