"""The package stays readable: no source file over 400 lines (issue 15; split along real seams)."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_no_package_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "modula_mhc").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along one idea per module): {long}"
