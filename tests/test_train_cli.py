"""The training CLI and loop: end-to-end runs, resume, outputs, and clear errors on bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from modula_mhc import cli
from modula_mhc.data import CharCorpus, DataError, default_corpus, load_text
from modula_mhc.train import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    atomic_write,
    load_checkpoint,
    lr_at,
    resolve_config,
    save_checkpoint,
    train,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a model small enough that 20 steps take a few seconds on 2 shared CPU cores
TINY = dict(width=32, depth=1, heads=2, context=32, batch=8, eval_batches=2)
TINY_FLAGS = ["--width", "32", "--depth", "1", "--heads", "2", "--context", "32", "--batch", "8",
              "--eval-batches", "2"]


def run_cli(*args, cwd=None, module="modula_mhc"):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def corpus_text():
    return default_corpus()


@pytest.fixture
def text_file(tmp_path, corpus_text):
    p = tmp_path / "text.txt"
    p.write_text(corpus_text[:60_000])
    return str(p)


# ------------------------------------------------------------------------------------------ data

def test_default_corpus_is_nontrivial_and_deterministic(corpus_text):
    assert len(corpus_text.encode()) > 100_000
    assert len(set(corpus_text)) > 50
    assert default_corpus() == corpus_text
    assert default_corpus(1000) == corpus_text[:1000]


def test_corpus_split_windows_and_roundtrip(corpus_text):
    c = CharCorpus.from_text(corpus_text[:20_000], context=16)
    assert c.vocab == "".join(sorted(set(corpus_text[:20_000])))
    assert len(c.train) == 18_000 and len(c.val) == 2_000
    assert c.decode(c.encode("def f():")) == "def f():"
    x, y = c.batch("train", 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    # every window is a contiguous slice of the training split
    text_ids = c.train.tolist()
    for row in x.tolist():
        starts = [i for i in range(len(text_ids) - 16) if text_ids[i:i + 16] == row]
        assert starts


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"hello\x00world" * 100, "NUL bytes"),
    (b"\xff\xfe\xfa not utf8" * 100, "not valid UTF-8"),
])
def test_load_text_rejects_bad_files(tmp_path, content, message):
    p = tmp_path / "data.bin"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_text(p)
    assert str(p) in str(e.value)


def test_too_short_text_is_rejected():
    with pytest.raises(DataError, match="too short"):
        CharCorpus.from_text("abcdefgh" * 10, context=64, source="x.txt")


@pytest.mark.parametrize("context", [1, 7, 64, 299])
def test_too_short_message_gives_the_exact_minimum(context):
    """The length the message asks for is accepted and one character less is not (it said one more
    than needed for every context from 1 to 299)."""
    import re
    with pytest.raises(DataError) as e:
        CharCorpus.from_text("ab" * 3, context=context, source="x.txt")
    need = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    text = ("abcdefg" * (need // 7 + 1))[:need]
    CharCorpus.from_text(text, context=context, source="x.txt")
    with pytest.raises(DataError, match="too short"):
        CharCorpus.from_text(text[:-1], context=context, source="x.txt")


# ------------------------------------------------------------------------------------------ config

def test_presets_and_defaults_resolve():
    c = resolve_config(TrainConfig(preset="small"))
    assert (c.width, c.depth, c.heads, c.context, c.batch, c.steps) == (128, 4, 4, 64, 12, 3200)
    c = resolve_config(TrainConfig(preset="small", width=64, optimizer="adamw"))
    assert c.width == 64 and c.manifolds == "muon" and c.lr == pytest.approx(1e-2)
    assert resolve_config(TrainConfig()).manifolds == "muon"   # the default since issue 11 (docs/decisions.md)


def test_default_lr_follows_the_run_length():
    """The lr transfers across width and depth, not across run length: the CLI's dualize default is
    lr_for_steps(steps) = 0.25·min(1, √(150/steps)) (measured optima 0.25, 0.125, 0.0625 at 150, 600,
    2400 steps); AdamW and a given --lr keep theirs; a resumed run keeps its checkpoint's lr."""
    from modula_mhc.config import DEFAULT_LR
    from modula_mhc.optim import lr_for_steps
    assert [lr_for_steps(t) for t in (1, 150, 600, 2400)] == [0.25, 0.25, 0.125, 0.0625]
    assert lr_for_steps(3200) == pytest.approx(0.25 * (150 / 3200) ** 0.5)
    for bad in (0, -5, 2.5, True, None):
        with pytest.raises(ValueError):
            lr_for_steps(bad)
    assert resolve_config(TrainConfig(preset="small")).lr == lr_for_steps(3200)
    assert resolve_config(TrainConfig(preset="tiny")).lr == DEFAULT_LR["dualize"]
    assert resolve_config(TrainConfig(preset="tiny", steps=600)).lr == 0.125
    assert resolve_config(TrainConfig(preset="small", optimizer="adamw")).lr == DEFAULT_LR["adamw"]
    assert resolve_config(TrainConfig(preset="small", lr=0.3)).lr == 0.3
    resumed = resolve_config(TrainConfig(steps=6000), checkpoint_config=resolve_config(TrainConfig(steps=600)).to_dict())
    assert resumed.lr == 0.125 and resumed.steps == 6000
    with pytest.raises(ConfigError, match="steps"):
        resolve_config(TrainConfig(steps=0))
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_train_arguments(parser)
    assert f"small {lr_for_steps(3200):.3g}" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("kwargs, option", [
    (dict(steps=-1), "steps"), (dict(width=30, heads=4), "heads"), (dict(preset="huge"), "preset"),
    (dict(manifolds="hyperbolic"), "manifolds"), (dict(residual="dense"), "residual"), (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"), (dict(streams=0), "streams"), (dict(width=6, heads=2), "heads"),
    (dict(optimizer="adamw", manifolds="all-stiefel"), "manifolds"), (dict(resume=""), "resume"),
    (dict(out=""), "out"), (dict(name="a/b"), "name"), (dict(force=True, resume="x"), "force"),
    (dict(optimizer="adamw", nonfinite="skip"), "nonfinite"), (dict(weight_decay=float("inf")), "weight_decay"),
    (dict(lr=1e39), "lr"), (dict(lr=1e7), "lr"),  # finite, but past float32 (or AdamW's lr/0.1 step)
])
def test_bad_config_raises_at_construction(kwargs, option):
    with pytest.raises(ConfigError, match=f"^{option}: ") as e:
        TrainConfig(**kwargs)
    assert e.value.option == option


def test_lr_schedules():
    c = resolve_config(TrainConfig(steps=100, lr=0.5, warmup=10, schedule="linear"))
    assert lr_at(0, c) == pytest.approx(0.05) and lr_at(9, c) == pytest.approx(0.5)
    assert lr_at(10, c) == pytest.approx(0.5) and lr_at(55, c) == pytest.approx(0.25)
    assert 0 < lr_at(99, c) < 0.5 / 80
    c = resolve_config(TrainConfig(steps=100, lr=0.5, schedule="cosine"))
    assert lr_at(50, c) == pytest.approx(0.25)
    c = resolve_config(TrainConfig(steps=100, lr=0.5, schedule="constant"))
    assert {lr_at(s, c) for s in range(100)} == {0.5}


# ------------------------------------------------------------------------------------------ checkpoints

def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half-written")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(p, broken)
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "ckpt.pt"
    save_checkpoint(good, {"config": {}, "vocab": "ab", "step": 0, "model": {}, "optimizer": {}, "rng": {},
                           "history": {}})
    assert load_checkpoint(good)["vocab"] == "ab"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    for path, message in ((truncated, "unreadable"), (foreign, "not a modula_mhc"), (tmp_path / "no.pt", "not exist")):
        with pytest.raises(CheckpointError, match=message) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------ end to end

def test_cli_end_to_end_tiny_run(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", *TINY_FLAGS, "--manifolds", "muon", "--steps", "20", "--eval-every", "10",
                "--sample-chars", "80", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("ckpt.pt", "metrics.json", "loss.png", "sample.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "sample.txt").read_text()) == 80
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 20 and [e["step"] for e in m["history"]["eval"]] == [0, 10, 20]
    assert m["tokens_per_s"] > 0 and all(math.isfinite(v) for v in m["history"]["train_loss"])
    # Uniform guessing over the ~96-char vocabulary costs ln 96 = 4.56 nats; 20 steps must learn at
    # least the character frequencies: val loss drops by > 1 nat (measured drops: docs/training.md).
    assert m["final"]["val_loss"] < m["initial"]["val"] - 1.0, (m["initial"], m["final"])
    assert "Traceback" not in r.stderr


def test_mlp_model_trains(tmp_path, text_file):
    """--model mlp: the CharMLP (one-hot of the last 8 chars → MLP) learns under DualizeRetract."""
    m = train(TrainConfig(**dict(TINY, data=text_file, model="mlp", depth=3, steps=30, eval_every=30, manifolds="muon",
                                 sample_chars=20, quiet=True, out=str(tmp_path / "mlp"))))
    assert m["final"]["val_loss"] < m["initial"]["val"] - 1.0, (m["initial"], m["final"])
    with pytest.raises(ConfigError, match="residual"):
        TrainConfig(model="mlp", residual="mhc")


# bit-identical resume (both optimizers, mHC, weight decay, warmup + cosine): tests/test_checkpoint.py


def test_resume_rejects_a_different_model(tmp_path, text_file):
    train(TrainConfig(**TINY, data=text_file, optimizer="adamw", steps=2, eval_every=2, sample_chars=0, quiet=True,
                      out=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="^width: "):
        train(TrainConfig(width=64, resume=str(tmp_path / "a"), steps=4, quiet=True))


# ------------------------------------------------------------------------------------------ CLI errors

def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert cli.main(["train", "--data", str(missing), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert str(missing) in capsys.readouterr().err
    err = cli_error(capsys, ["train", "--steps", "-3"])
    assert err.startswith("modula-mhc train: error: --steps: must be a positive integer")


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary" * 50, b"\xc3\x28 broken utf8 " * 50, b"too short"])
def test_cli_rejects_bad_data_files(tmp_path, capsys, content):
    p = tmp_path / "data.txt"
    p.write_bytes(content)
    assert cli.main(["train", "--data", str(p), "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and err.startswith("modula-mhc train: error:")
    assert not (tmp_path / "run").exists()  # a run that failed before writing leaves no directory behind


@pytest.mark.parametrize("flags, mentioned", [
    (["--steps", "-5"], "--steps"), (["--steps", "0"], "--steps"), (["--width", "30", "--heads", "4"], "--heads"),
    (["--preset", "huge"], "--preset"), (["--manifolds", "banana"], "--manifolds"), (["--residual", "x"], "--residual"),
    (["--lr", "-1"], "--lr"), (["--lr", "abc"], "--lr"), (["--device", "tpu"], "--device"),
    (["--warmup", "50", "--steps", "10"], "--warmup"), (["--resume", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--lr", "1e39"], "--lr"), (["--optimizer", "adamw", "--lr", "3e38"], "--lr"),  # were tracebacks, exit 1
])
def test_cli_rejects_nonsense_flags(tmp_path, capsys, flags, mentioned):
    try:
        code = cli.main(["train", *flags, "--out", str(tmp_path / "run")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert mentioned in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ numerics

def test_nonfinite_loss_is_the_optimizers_policy(tmp_path, text_file, monkeypatch):
    """A NaN loss (hence NaN gradients) at two steps: DualizeRetract's policy skips and counts them —
    the loop has no check of its own; with nonfinite="raise" the optimizer stops the run."""
    import modula_mhc.loop as L  # the training loop's steps call loop.loss_of
    real_loss_of, calls = L.loss_of, {"n": 0}

    def poisoned(model, x, y, autocast_dtype, device):
        loss = real_loss_of(model, x, y, autocast_dtype, device)
        if model.training:
            calls["n"] += 1
            if calls["n"] in (2, 4):  # training steps 2 and 4 get a NaN loss (and NaN gradients)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(L, "loss_of", poisoned)
    kw = dict(TINY, data=text_file, manifolds="muon", steps=6, eval_every=6, sample_chars=0, quiet=True)
    with pytest.warns(RuntimeWarning, match="non-finite gradient .*optimizer step skipped"):
        m = train(TrainConfig(**kw, out=str(tmp_path / "nan")))
    assert m["skipped_steps"] == 2
    saved = json.loads((tmp_path / "nan" / "metrics.json").read_text())  # strict JSON: NaN saved as null
    assert saved["skipped_steps"] == 2 and saved["history"]["train_loss"][1] is None
    ckpt = load_checkpoint(tmp_path / "nan" / "ckpt.pt")
    assert ckpt["optimizer"]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert math.isfinite(m["final"]["val_loss"])
    calls["n"] = 0
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(TrainConfig(**kw, nonfinite="raise", out=str(tmp_path / "nan2")))
    assert json.loads((tmp_path / "nan2" / "metrics.json").read_text())["status"] == "diverged"



def test_cli_warnings_are_one_line(tmp_path, capsys, text_file, monkeypatch):
    import modula_mhc.loop as L  # the training loop's steps call loop.loss_of
    real_loss_of, calls = L.loss_of, {"n": 0}

    def poisoned(model, *args):
        calls["n"] += model.training
        return real_loss_of(model, *args) * (float("nan") if model.training and calls["n"] == 2 else 1.0)

    monkeypatch.setattr(L, "loss_of", poisoned)
    assert cli.main(["train", *MINI_FLAGS, "--data", text_file, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err == "modula-mhc train: warning: non-finite gradient (NaN or Inf): optimizer step skipped (1 so far)\n"


def test_bfloat16_autocast_runs_and_matches_fp32_at_start(tmp_path, text_file):
    kw = dict(TINY, data=text_file, optimizer="adamw", steps=3, eval_every=3, sample_chars=0, quiet=True)
    m32 = train(TrainConfig(**kw, out=str(tmp_path / "fp32")))
    m16 = train(TrainConfig(**kw, dtype="bfloat16", out=str(tmp_path / "bf16")))
    # same initial weights and batches: the first losses differ only by bf16 rounding (~3 digits)
    assert m16["history"]["train_loss"][0] == pytest.approx(m32["history"]["train_loss"][0], rel=2e-2)
    assert math.isfinite(m16["final"]["val_loss"])


# ------------------------------------------------------------------------------------------ runs (issue 14)
# A seconds-long configuration: 16 wide, unconstrained matrices (no dual ascent), 4 steps.
MINI = dict(width=16, depth=1, heads=2, context=16, batch=4, eval_batches=1, steps=4, eval_every=2, sample_chars=0,
            manifolds="muon", quiet=True)
MINI_FLAGS = ["--width", "16", "--depth", "1", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches",
              "1", "--steps", "4", "--eval-every", "2", "--sample-chars", "0", "--manifolds", "muon", "--quiet"]


def cli_error(capsys, argv, command="train"):
    """Run cli.main; assert exit 2 and exactly one stderr line; return that line."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"modula-mhc {command}: error: "), (code, err)
    assert "Traceback" not in err
    return err.strip()


def test_a_run_is_never_overwritten_without_resume_or_force(tmp_path, capsys, text_file):
    out = tmp_path / "run"
    flags = [*MINI_FLAGS, "--data", text_file, "--out", str(out)]
    assert cli.main(["train", *flags]) == 0
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "metrics.json", "metrics.jsonl", "loss.png")}
    err = cli_error(capsys, ["train", *flags, "--seed", "1"])
    assert "--out" in err and "already holds a run" in err and "--force" in err
    assert {f: (out / f).read_bytes() for f in before} == before  # untouched
    # --force with a data file that cannot be read fails before anything is deleted
    bad = [*MINI_FLAGS, "--data", str(tmp_path / "no_such.txt"), "--out", str(out)]
    assert "no_such.txt" in cli_error(capsys, ["train", *bad, "--seed", "1", "--force"])
    assert {f: (out / f).read_bytes() for f in before} == before
    assert cli.main(["train", *flags, "--seed", "1", "--force"]) == 0
    assert load_checkpoint(out / "ckpt.pt")["config"]["seed"] == 1
    assert "--force" in cli_error(capsys, ["train", "--resume", str(out), "--force"])
    # resuming into another run's directory is refused too; into a new directory it continues there
    other = tmp_path / "other"
    assert cli.main(["train", *flags[:-1], str(other)]) == 0
    assert "already holds a run" in cli_error(capsys, ["train", "--resume", str(out), "--steps", "6",
                                                       "--out", str(other), "--quiet"])
    assert cli.main(["train", "--resume", str(out), "--steps", "6", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 6 and load_checkpoint(out / "ckpt.pt")["step"] == 4


def test_a_locked_run_directory_refuses_a_second_run(tmp_path, capsys, text_file):
    from modula_mhc.checkpoint import RunDirectory
    out = tmp_path / "run"
    with RunDirectory(out, fresh=True):  # another run holds the directory
        err = cli_error(capsys, ["train", *MINI_FLAGS, "--data", text_file, "--out", str(out)])
        assert "in use by another run" in err and f"pid {os.getpid()}" in err
    assert cli.main(["train", *MINI_FLAGS, "--data", text_file, "--out", str(out)]) == 0  # released


def test_resume_errors_instead_of_rewriting_outputs(tmp_path, capsys, text_file):
    out = tmp_path / "run"
    train(TrainConfig(**MINI, data=text_file, out=str(out)))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert "--resume" in cli_error(capsys, ["train", "--resume", ""])
    for steps in ("2", "4"):
        err = cli_error(capsys, ["train", "--resume", str(out), "--steps", steps])
        assert "--steps" in err and "4 steps already" in err
    assert "4 steps already" in cli_error(capsys, ["train", "--resume", str(out)])  # the finished run's own 4
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_a_diverging_run_keeps_the_last_good_checkpoint(tmp_path, capsys, text_file):
    def poison(info):  # the weights turn NaN after step 2's checkpoint
        if info["step"] == 4:
            with torch.no_grad():
                next(info["model"].parameters()).fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"last good checkpoint \(step 2\) is kept"):
        train(TrainConfig(**MINI, data=text_file, out=str(tmp_path / "a")), callback=poison)
    ckpt = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["status"] == "diverged"
    # from the CLI: an absurd weight decay; one line, exit 2, never a NaN checkpoint
    err = cli_error(capsys, ["train", *MINI_FLAGS, "--data", text_file, "--weight-decay", "1e20",
                             "--out", str(tmp_path / "b")])
    assert "no longer finite" in err
    if (tmp_path / "b" / "ckpt.pt").exists():
        assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "b" / "ckpt.pt")["model"].values())


def test_unusable_run_directories_are_one_line_errors(tmp_path, capsys, text_file, monkeypatch):
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    for out in (str(regular), str(regular / "run"), ""):
        assert "--out" in cli_error(capsys, ["train", *MINI_FLAGS, "--data", text_file, "--out", out])
    import modula_mhc.checkpoint as C

    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0])

    monkeypatch.setattr(C.os, "makedirs", no_permission)  # (root ignores chmod, so simulate it)
    assert "Permission denied" in cli_error(capsys, ["train", *MINI_FLAGS, "--data", text_file, "--out",
                                                     str(tmp_path / "ro")])


def test_fifo_as_data_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    import signal

    def hung(*_):
        raise AssertionError("reading the FIFO blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        err = cli_error(capsys, ["train", *MINI_FLAGS, "--data", str(fifo), "--out", str(tmp_path / "run")])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "not a regular file" in err and str(fifo) in err


def test_live_jsonl_log_and_resume_rewrites_it(tmp_path, text_file):
    out = tmp_path / "run"
    seen = {}

    def read_log(info):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        seen[info["step"]] = [json.loads(line) for line in lines]

    train(TrainConfig(**MINI, data=text_file, out=str(out)), callback=read_log)
    at2 = seen[2]  # written while the run was going: eval 0, steps 1-2, eval 2
    assert [(r["kind"], r["step"]) for r in at2] == [("eval", 0), ("step", 1), ("step", 2), ("eval", 2)]
    assert all(math.isfinite(r["train_loss"]) and r["lr"] > 0 for r in at2 if r["kind"] == "step")
    train(TrainConfig(resume=str(out), steps=6, quiet=True))
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    m = json.loads((out / "metrics.json").read_text())
    assert [r["train_loss"] for r in log if r["kind"] == "step"] == m["history"]["train_loss"]


def test_ctrl_c_writes_metrics_plot_and_checkpoint_then_exits_nonzero(tmp_path, capsys, text_file, monkeypatch):
    import signal

    import modula_mhc.loop as L  # the training loop's steps call loop.loss_of
    real, calls = L.loss_of, {"n": 0}

    def press_ctrl_c(model, *args):  # a real SIGINT inside training step 3: the loop stops after it
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return real(model, *args)

    monkeypatch.setattr(L, "loss_of", press_ctrl_c)
    out = tmp_path / "run"
    code = cli.main(["train", *MINI_FLAGS, "--steps", "20", "--data", text_file, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "interrupted at step 3 of 20" in err, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["steps"] == 3 and (out / "loss.png").is_file()
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(L, "loss_of", real)
    assert train(TrainConfig(resume=str(out), steps=5, quiet=True))["steps"] == 5  # and it resumes


def test_sample_subcommand_and_version(tmp_path, capsys, text_file):
    out = tmp_path / "run"
    train(TrainConfig(**MINI, data=text_file, out=str(out)))
    assert cli.main(["sample", str(out), "--chars", "30", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert len(text) == 31 and text.endswith("\n")
    assert cli.main(["generate", str(out / "ckpt.pt"), "--chars", "30", "--seed", "3", "--prompt", "def"]) == 0
    assert len(capsys.readouterr().out) == 31
    assert "--temperature" in cli_error(capsys, ["sample", str(out), "--temperature", "0"], "sample")
    # tiny temperatures are greedy sampling (1e-40 and 1e-300 overflowed float32 into a NaN softmax)
    greedy = []
    for t in ("1e-30", "1e-40", "1e-300"):
        assert cli.main(["sample", str(out), "--chars", "20", "--seed", t[-2:], "--temperature", t]) == 0
        greedy.append(capsys.readouterr().out)
    assert greedy[0] == greedy[1] == greedy[2]
    assert "--prompt" in cli_error(capsys, ["sample", str(out), "--prompt", "\u2603"], "sample")
    assert "does not exist" in cli_error(capsys, ["sample", str(tmp_path / "nope")], "sample")
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"modula-mhc {__import__('modula_mhc').__version__}"


def test_changing_threads_on_resume_continues_but_is_not_promised_bitwise(tmp_path, text_file):
    """docs/training.md: bit-identical only with the same --threads (and device, dtype)."""
    kw = dict(MINI, data=text_file, schedule="constant")
    straight = train(TrainConfig(**kw, out=str(tmp_path / "a")))
    train(TrainConfig(**{**kw, "steps": 2}, out=str(tmp_path / "b")))
    resumed = train(TrainConfig(resume=str(tmp_path / "b"), steps=4, threads=2, quiet=True))
    assert resumed["config"]["threads"] == 2
    assert resumed["history"]["train_loss"] == pytest.approx(straight["history"]["train_loss"], rel=1e-4)


def test_resume_compares_options_the_checkpoint_left_unset():
    """An option at its unset default in the checkpoint (data: the embedded corpus) is compared too."""
    embedded = resolve_config(TrainConfig(steps=4)).to_dict()
    with pytest.raises(ConfigError, match="^data: the checkpoint was trained with the embedded corpus") as e:
        resolve_config(TrainConfig(steps=8, data="other.txt"), checkpoint_config=embedded)
    assert e.value.option == "data"
    adamw = resolve_config(TrainConfig(steps=4, optimizer="adamw")).to_dict()
    with pytest.raises(ConfigError, match="^nonfinite: "):
        resolve_config(TrainConfig(steps=8, nonfinite="skip"), checkpoint_config=adamw)
    assert resolve_config(TrainConfig(steps=8), checkpoint_config=embedded).data is None  # unchanged: fine
    legacy = {k: v for k, v in embedded.items() if k != "ngram"}  # a key older checkpoints lack
    assert resolve_config(TrainConfig(steps=8, ngram=3), checkpoint_config=legacy).ngram == 3


def test_bare_resume_with_name_or_out_continues_exactly_that_run(tmp_path, capsys, monkeypatch, text_file):
    """--resume without PATH: <out>/ckpt.pt, <out> = --out or runs/<--name>; never another run."""
    monkeypatch.chdir(tmp_path)
    flags = [*MINI_FLAGS, "--data", text_file]
    assert cli.main(["train", *flags, "--name", "foo"]) == 0
    assert cli.main(["train", *flags, "--name", "bar", "--seed", "1"]) == 0
    os.utime("runs/bar/ckpt.pt", (2e9, 2e9))  # bar is the newest run
    bar = {f: (tmp_path / "runs" / "bar" / f).read_bytes() for f in os.listdir("runs/bar")}
    assert cli.main(["train", "--resume", "--name", "foo", "--steps", "6", "--quiet"]) == 0
    foo = load_checkpoint("runs/foo/ckpt.pt")
    assert foo["step"] == 6 and foo["config"]["name"] == "foo" and foo["config"]["seed"] == 0
    assert cli.main(["train", "--resume", "--out", "runs/foo", "--steps", "8", "--quiet"]) == 0
    assert load_checkpoint("runs/foo/ckpt.pt")["step"] == 8
    for flag in (["--name", "nosuch"], ["--out", str(tmp_path / "nosuch")]):
        err = cli_error(capsys, ["train", "--resume", *flag, "--steps", "10"])
        assert "nosuch" in err and "does not exist" in err
    assert {f: (tmp_path / "runs" / "bar" / f).read_bytes() for f in os.listdir("runs/bar")} == bar
    assert not os.path.exists("runs/nosuch") and not os.path.exists(tmp_path / "nosuch")
    assert cli.main(["train", "--resume", "--steps", "6", "--quiet"]) == 0  # bare: the newest run, bar
    assert load_checkpoint("runs/bar/ckpt.pt")["step"] == 6


def test_resume_by_path_never_writes_into_another_runs_directory(tmp_path, capsys, text_file):
    """A checkpoint file kept in another run's directory is refused there; --out continues it elsewhere."""
    flags = [*MINI_FLAGS, "--data", text_file]
    a, b = tmp_path / "A", tmp_path / "B"
    assert cli.main(["train", *flags, "--out", str(a)]) == 0
    assert cli.main(["train", *flags, "--out", str(b), "--seed", "1"]) == 0
    (a / "B_backup.pt").write_bytes((b / "ckpt.pt").read_bytes())
    before = {f: (a / f).read_bytes() for f in os.listdir(a)}
    err = cli_error(capsys, ["train", "--resume", str(a / "B_backup.pt"), "--steps", "6"])
    assert err.startswith("modula-mhc train: error: --resume: ") and "another run" in err and "--out" in err
    assert {f: (a / f).read_bytes() for f in os.listdir(a)} == before
    assert cli.main(["train", "--resume", str(a / "B_backup.pt"), "--steps", "6", "--out", str(tmp_path / "C"),
                     "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "C" / "ckpt.pt")["config"]["seed"] == 1
    # a byte-identical copy of the directory's own checkpoint is that run: it continues in place
    (a / "snapshot.pt").write_bytes((a / "ckpt.pt").read_bytes())
    assert cli.main(["train", "--resume", str(a / "snapshot.pt"), "--steps", "6", "--quiet"]) == 0
    assert load_checkpoint(a / "ckpt.pt")["step"] == 6
    # now snapshot.pt is an older state of A: resuming it in place would drop A's steps 5-6
    assert "another run" in cli_error(capsys, ["train", "--resume", str(a / "snapshot.pt"), "--steps", "8"])
    assert load_checkpoint(a / "ckpt.pt")["step"] == 6


@pytest.mark.parametrize("flags, note", [
    (["--dtype", "bfloat16"], "--dtype bfloat16 (the checkpoint used float32)"),
    (["--threads", "2"], "--threads 2 (the checkpoint used 1)"),
    ([], "--device cpu (the checkpoint used cuda)"),  # the checkpoint below claims cuda
])
def test_changing_threads_dtype_or_device_on_resume_prints_a_note(tmp_path, capsys, text_file, flags, note):
    """docs/training.md, Resuming: such a continuation is not bitwise, and the run says so."""
    out = tmp_path / "run"
    train(TrainConfig(**{**MINI, "steps": 2}, data=text_file, out=str(out)))
    if not flags:  # a checkpoint written on a GPU: same content, device "cuda"
        payload = load_checkpoint(out / "ckpt.pt")
        save_checkpoint(out / "ckpt.pt", {k: v for k, v in payload.items() if k not in ("format", "checksum")}
                        | {"device": "cuda"})
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--steps", "4", "--device", "cpu", *flags]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and note in notes[0] and "not bit-identical" in notes[0], notes


def test_quoted_hetero_cost_is_the_measured_one(capsys):
    """README and --help quote the anchor's Hetero/AdamW step ratio that the committed benchmark
    result measured last (benchmarks/results/train_step_anchor_hetero_hetero-floor.json), rounded."""
    with open(os.path.join(REPO, "benchmarks", "results", "train_step_anchor_hetero_hetero-floor.json"),
              encoding="utf-8") as f:
        rows = {r["method"]: r for r in json.load(f)["rows"]}
    ratio = round(rows["hetero"]["ratio_vs_adamw"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"~{ratio}x AdamW per step on a CPU, ~37x Muon on an H100" in help_text
    readme = " ".join(open(os.path.join(REPO, "README.md"), encoding="utf-8").read().split())
    assert f"~{ratio}× AdamW on a CPU and 37× Muon on an H100" in readme


# ------------------------------------------------------------------------------------------ layout (issue 15)

def test_package_layout_one_source_per_policy():
    import ast
    import glob

    from modula_mhc import config, optim
    pkg = os.path.join(REPO, "modula_mhc")
    mine = ("train", "config", "checkpoint", "outputs", "sampling", "cli", "data", "distributed")
    long = {p: n for p in (os.path.join(pkg, f"{m}.py") for m in mine)
            if (n := len(open(p, encoding="utf-8").read().splitlines())) > 400}
    assert not long, long
    assert config.MANIFOLD_PRESETS is optim.presets.PRESETS
    for ex in glob.glob(os.path.join(REPO, "examples", "*.py")):
        assert "MANIFOLD_PRESETS = {" not in open(ex, encoding="utf-8").read(), ex
    # the loop imports neither the CLI nor has a __main__ of its own; config/checkpoint import no loop
    for name, forbidden in (("train", {"cli"}), ("config", {"train", "cli", "checkpoint"}),
                            ("checkpoint", {"train", "cli"}), ("outputs", {"train", "cli"}),
                            ("sampling", {"train", "cli"})):
        tree = ast.parse(open(os.path.join(pkg, f"{name}.py"), encoding="utf-8").read())
        imported = {(n.module or "").lstrip(".").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & forbidden, (name, imported & forbidden)
        assert "__main__" not in ast.unparse(tree), name
    src = open(os.path.join(pkg, "train.py"), encoding="utf-8").read()
    assert "not available in this build" not in src and "isfinite(loss" not in src


def test_evaluation_windows_do_not_depend_on_the_seed():
    """Runs with different seeds are scored on the same validation windows (they were drawn from
    seed + constant, so seed-1 and seed-0 losses measured different text)."""
    from modula_mhc.loop import estimate_loss
    corpus = CharCorpus.from_text(default_corpus()[:20000], 16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(corpus.vocab_size, 8), torch.nn.Linear(8, corpus.vocab_size))
    losses = [estimate_loss(model, corpus, resolve_config(TrainConfig(seed=s, context=16, batch=4, eval_batches=3)), torch.device("cpu"), None)
              for s in (0, 1, 7)]
    assert losses[0] == losses[1] == losses[2]
    assert losses[0]["val"] != losses[0]["train"]


@pytest.mark.parametrize("device,retains", [("cpu", True), ("cuda", False)])
def test_cli_retains_freed_cpu_memory_for_cpu_runs_only(monkeypatch, tmp_path, device, retains):
    calls, trained = [], []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "train", lambda config: trained.append(config))
    assert cli.main(["train", "--steps", "1", "--device", device, "--out", str(tmp_path / "run")]) == 0
    assert len(trained) == 1 and bool(calls) == retains
