"""benchmarks/time_to_loss.py: when each run first reaches the reference run's final val loss."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _tool():
    spec = importlib.util.spec_from_file_location("time_to_loss", os.path.join(ROOT, "benchmarks", "time_to_loss.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, name, points):
    d = tmp_path / name
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "step", "step": 1, "train_loss": 3.0}) + "\n")
        for step, val, secs in points:
            f.write(json.dumps({"kind": "eval", "step": step, "val": val, "train": val, "train_seconds": secs}) + "\n")
    return str(d)


def test_reaching_the_reference_loss(tmp_path):
    ref = _run(tmp_path, "ref", [(0, 4.0, 0.0), (100, 2.0, 10.0), (200, 1.7, 20.0)])
    fast = _run(tmp_path, "fast", [(0, 4.0, 0.0), (100, 1.69, 15.0), (200, 1.6, 30.0)])
    slow = _run(tmp_path, "slow", [(0, 4.0, 0.0), (200, 1.8, 25.0)])
    rows = _tool().main([ref, fast, slow, "--out", str(tmp_path / "out")])
    by = {r["run"]: r for r in rows}
    assert by["fast"]["reaches_reference_at"] == {"step": 100, "train_seconds": 15.0}
    assert by["slow"]["reaches_reference_at"] is None
    assert by["ref"]["final_val"] == 1.7
    assert json.load(open(tmp_path / "out.json"))["reference"] == "ref"


def test_not_a_run_directory_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        _tool().main([str(tmp_path), "--out", str(tmp_path / "o")])
