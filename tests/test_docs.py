"""The docs stay true: README's code runs, and the API reference builds from the docstrings."""
import pathlib
import re
import runpy

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_code_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # the "network in a few lines" example
    net, upd = namespace["net"], namespace["upd"]
    assert abs(net.norm(upd).item() - 1.0) < 1e-3
    assert namespace["y"].shape == (32, 10)
    # the optimizer snippet continues the same session (issue 14: it used to raise NameError)
    for block in blocks[1:2]:
        exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])


def test_api_reference_builds():
    mod = runpy.run_path(str(ROOT / "docs" / "build_api.py"))
    text = mod["render"]()
    for name in ("DualizeRetract", "HyperConnections", "Stiefel", "sinkhorn", "properties", "GPT"):
        assert name in text, name
