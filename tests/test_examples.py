"""The example scripts run end to end at a tiny size (so they cannot rot), and their analysis
helpers compute what they claim."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A small deterministic corpus (no dependency on the development data set)."""
    g = torch.Generator().manual_seed(0)
    words = ["the ", "king ", "and ", "queen ", "of ", "rome ", "said ", "\n"]
    text = "".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------ end to end
def test_lr_transfer_runs_and_merges(tiny_text, tmp_path):
    lrt = load("lr_transfer")
    common = ["--data", tiny_text, "--out", str(tmp_path), "--steps", "3", "--seeds", "1", "--widths", "16", "32",
              "--lrs", "0.1", "0.2", "--adamw-lrs", "0.001", "0.002", "--context", "8", "--val-batches", "1",
              "--sweep", "width"]
    lrt.main(common + ["--model", "mlp", "gpt", "--optimizer", "adamw"])
    lrt.main(common + ["--model", "mlp", "--optimizer", "dualize"])
    for model in ("mlp", "gpt"):
        stem = tmp_path / f"lr_transfer_{model}_width"
        assert (stem.with_suffix(".png")).stat().st_size > 0
        data = json.loads(stem.with_suffix(".json").read_text())
        expected = {"adamw", "dualize"} if model == "mlp" else {"adamw"}
        assert set(data["results"]) == expected  # the second command kept the first one's baseline
        for res in data["results"].values():
            assert len(res["losses"]) == 2 and all(len(per_lr) == 2 for per_lr in res["losses"])
            assert all(0 < v < 10 for per_lr in res["losses"] for s in per_lr for v in s)
        assert "| adamw | 16 |" in stem.with_suffix(".md").read_text()


def test_manifold_study_runs(tiny_text, tmp_path):
    ms = load("manifold_study")
    ms.main(["--data", tiny_text, "--out", str(tmp_path), "--steps", "3", "--presets", "muon", "all-dgram",
             "--width", "16", "--heads", "2", "--depth", "1", "--context", "8", "--batch", "4", "--eval-every", "2",
             "--sv-every", "1", "--val-batches", "1", "--dual-max-iters", "3"])
    data = json.loads((tmp_path / "manifold_study.json").read_text())
    assert set(data["summary"]) == {"muon", "all-dgram"}
    sig = data["runs"]["muon"][0]["qk_sigma_max"]
    assert sig["step"] == [0, 1, 2, 3] and all(s > 0 for s in sig["max"])
    assert (tmp_path / "manifold_study.png").stat().st_size > 0
    assert "| all-dgram | dgram | dgram |" in (tmp_path / "manifold_study.md").read_text()


def test_lr_vs_steps_runs_and_reuses_finished_runs(tiny_text, tmp_path, monkeypatch):
    lvs = load("lr_vs_steps")
    args = ["--data", tiny_text, "--steps", "2", "4", "--factors", "0.5", "1", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path)]
    rows = lvs.main(args)
    assert [(r["steps"], r["lr"]) for r in rows] == [(2, 0.125), (2, 0.25), (4, 0.125), (4, 0.25)]
    assert all(0 < r["val"] < 10 for r in rows)
    assert "| 4 | 0.25 |" in (tmp_path / "lr_vs_steps.md").read_text()
    assert (tmp_path / "lr_vs_steps.png").stat().st_size > 0

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(lvs, "train", no_training)
    assert lvs.main(args) == rows


def test_mhc_study_runs(tiny_text, tmp_path):
    st = load("mhc_study")
    st.main(["--data", tiny_text, "--out", str(tmp_path), "--steps", "2", "--width", "16", "--heads", "2",
             "--depth", "2", "--context", "8", "--batch", "4", "--eval-every", "1", "--gain-every", "1",
             "--val-batches", "1"])
    data = json.loads((tmp_path / "mhc_study.json").read_text())
    runs = data["runs"]
    assert set(runs) == {"plain", "hc", "mhc"}
    assert runs["plain"]["gains"]["forward"] == [1.0, 1.0, 1.0]
    # mHC mixes with doubly-stochastic matrices: composite gains 1 up to the Sinkhorn tolerance
    for key in ("forward", "backward"):
        assert all(abs(g - 1) < 1e-2 for g in runs["mhc"]["gains"][key])
    assert (tmp_path / "mhc_study.png").stat().st_size > 0


def test_bad_flags_are_refused(tiny_text):
    lrt = load("lr_transfer")
    with pytest.raises(SystemExit):
        lrt.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        lrt.parse_args(["--lrs", "0.1", "-0.2"])
    with pytest.raises(SystemExit):
        load("manifold_study").parse_args(["--width", "30", "--heads", "4"])


# ------------------------------------------------------------------------------------ analysis
def test_refined_optimum_is_the_parabola_vertex():
    lrt = load("lr_transfer")
    log2 = [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0]
    vertex = -2.3
    losses = [2.0 + 0.1 * (x - vertex) ** 2 for x in log2]
    i, x = lrt.optimum(log2, losses)
    assert log2[i] == -2.0 and x == pytest.approx(vertex, abs=1e-12)
    # a diverged neighbour leaves the grid optimum unrefined; all diverged → nothing
    i, x = lrt.optimum(log2, losses[:4] + [math.inf, math.inf])
    assert (i, x) == (3, -2.0)
    assert lrt.optimum(log2, [math.inf] * 6) == (None, None)


def test_drift_counts_grid_steps():
    lrt = load("lr_transfer")
    lrs = [2.0 ** e for e in range(-5, 1)]
    curves = {w: [1.0 + 0.1 * (math.log2(lr) - c) ** 2 for lr in lrs] for w, c in ((64, -3), (128, -3), (256, -1))}
    res = dict(lrs=lrs, sizes=list(curves), losses=[[[v, v] for v in c] for c in curves.values()])
    s = lrt.summarise(res)
    assert [r["best_index"] for r in s["rows"]] == [2, 2, 4]
    assert s["drift_grid_steps"] == 2 and s["drift_log2"] == pytest.approx(2.0)
    assert not s["optimum_at_grid_edge"]


def test_ngram_features_have_unit_rms_and_right_targets():
    common = load("_common")
    ids = torch.tensor([3, 1, 4, 1, 5, 0, 2, 6])
    x, y = common.ngram_features(ids, torch.tensor([3, 7]), k=3, vocab_size=7)
    assert x.shape == (2, 21)
    assert torch.allclose(x.pow(2).mean(dim=1).sqrt(), torch.ones(2))
    assert y.tolist() == [1, 6]
    assert x[0].view(3, 7).argmax(dim=1).tolist() == [3, 1, 4]  # previous characters, oldest first


def test_run_stops_at_divergence():
    common = load("_common")

    class Blowup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.w * x

    model = Blowup()
    batches = iter([(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([0]))] +
                   [(torch.tensor([[math.nan, 0.0, 0.0]]), torch.tensor([0]))] * 5)
    rec = common.run(model, torch.optim.SGD(model.parameters(), lr=0.1), 5, batches, 0.1,
                     val_batches=[(torch.ones(1, 3), torch.tensor([0]))])
    assert rec["diverged"] and rec["val_loss"] == math.inf and len(rec["losses"]) == 1


# ------------------------------------------------------------------------------------ bad arguments
#: a GPT study at the smallest size (should a bad argument slip through, the run is still short)
TINY_GPT = ["--steps", "2", "--width", "16", "--heads", "2", "--depth", "1", "--context", "8", "--batch", "4",
            "--eval-every", "1", "--val-batches", "1"]
MISSING = os.path.join(os.sep, "nonexistent", "data.txt")


def _bad_arguments(tmp):
    """(script, argv, part of the message): each is refused before any training."""
    out = ["--out", str(tmp)]
    lrt = ["--model", "gpt", "--sweep", "width", "--optimizer", "dualize", "--steps", "1", "--seeds", "1",
           "--lrs", "0.1", "--context", "8", "--batch", "2", "--val-batches", "1"] + out
    lvs = ["--steps", "2", "--factors", "1", "--runs", str(tmp / "runs")] + out
    return [
        ("manifold_study", TINY_GPT + ["--width", "12", "--heads", "4", "--presets", "muon"] + out, "must be even"),
        ("mhc_study", TINY_GPT + ["--width", "12", "--heads", "4", "--residuals", "plain"] + out, "must be even"),
        ("manifold_study", TINY_GPT + ["--data", MISSING, "--presets", "muon"] + out, "does not exist"),
        ("mhc_study", TINY_GPT + ["--data", MISSING, "--residuals", "plain"] + out, "does not exist"),
        ("manifold_study", TINY_GPT + ["--warmup", "5", "--presets", "muon"] + out, "--warmup must be smaller"),
        ("lr_transfer", lrt + ["--widths", "16", "--data", MISSING], "does not exist"),
        ("lr_transfer", lrt + ["--widths", "50"], "must divide its width 50"),
        ("lr_transfer", lrt + ["--widths", "17"], "must be even"),
        ("lr_transfer", lrt + ["--widths", "16", "--fixed-depth", "0"], "--fixed-depth must be >= 1"),
        ("lr_vs_steps", lvs + ["--data", MISSING], "does not exist"),
        ("lr_vs_steps", lvs + ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("lr_vs_steps", lvs + ["--factors", "-1"], "--factors must be positive"),
        ("lr_vs_steps", lvs + ["--preset", "huge"], "invalid choice: 'huge'"),
        ("lr_vs_steps", lvs + ["--seed", "-1"], "--seed:"),
        ("mhc_gains", ["--out", str(tmp / "figure.foo")], "neither a folder nor a figure file"),
    ]


@pytest.mark.parametrize("case", [pytest.param(i, id=f"{c[0]}-{i}") for i, c in enumerate(_bad_arguments(pathlib.Path()))])
def test_bad_arguments_are_one_line_argparse_errors(case, tiny_text, tmp_path, capsys, monkeypatch):
    name, argv, message = _bad_arguments(tmp_path)[case]
    if name not in ("lr_vs_steps", "mhc_gains") and "--data" not in argv:
        argv = argv + ["--data", tiny_text]
    module = load(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, argparse's last
    assert message in errors[0], errors[0]
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_mhc_gains_out_is_a_folder_or_a_file(tmp_path, capsys, monkeypatch):
    gains = load("mhc_gains")
    stack, gpt = gains.random_stack, gains.perturbed_gpt
    monkeypatch.setattr(gains, "random_stack", lambda constrained, **kw: stack(constrained, **{**kw, "layers": 3}))
    monkeypatch.setattr(gains, "perturbed_gpt", lambda residual, **kw: gpt(residual, **{**kw, "depth": 1}))
    folder = tmp_path / "figs"
    folder.mkdir()
    gains.main(["--out", str(folder)])
    figure = folder / "mhc_gains.png"
    assert figure.stat().st_size > 0 and sorted(os.listdir(tmp_path)) == ["figs"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {figure} (")
    gains.main(["--out", str(tmp_path / "new" / "gains.png")])  # a file path, as docs/results.md gives it
    assert (tmp_path / "new" / "gains.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path / "new")) == ["gains.png"]
