"""Checkpoint guarantees of the training loop (modula_mhc.train):

* resume is a bit-identical continuation on CPU — N steps straight and N/2 + resume + N/2 end with
  equal model weights, optimizer state (momentum buffers, step counts), learning-rate schedule,
  RNG states and data position;
* writes are atomic — a writer SIGKILLed mid-write leaves the previous checkpoint loadable;
* a truncated, empty, foreign or bit-flipped file gives a CheckpointError naming the file (no torch
  traceback), from the Python API and from the CLI (one line, exit 2);
* a full disk during a write keeps the old checkpoint; files get ordinary permissions (0644).
"""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from modula_mhc.train import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# small enough that 8 steps take a few seconds on 2 shared CPU cores
TINY = dict(width=32, depth=1, heads=2, context=16, batch=4, eval_batches=1, sample_chars=0, quiet=True)


def _text(tmp_path):
    from modula_mhc.data import default_corpus
    p = tmp_path / "text.txt"
    p.write_text(default_corpus()[:30_000])
    return str(p)


def _assert_same_tree(a, b, where="checkpoint"):
    """Recursive bitwise equality of nested dicts/lists/tensors (NaN-free)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("optimizer, extra", [
    pytest.param("dualize", dict(manifolds="hetero"), id="dualize-hetero"),
    pytest.param("dualize", dict(manifolds="muon", residual="mhc", streams=2, weight_decay=0.01),
                 id="dualize-mhc"),
    pytest.param("adamw", dict(), id="adamw"),
])
def test_resume_is_bit_identical(tmp_path, optimizer, extra):
    """8 steps straight == 4 steps, crash, resume, 4 more: every tensor of the final checkpoint
    (weights, momentum, step counts, RNG, data generator) and every logged number agree bitwise."""
    data = _text(tmp_path)
    # warmup + cosine over the full 8 steps: the schedule depends on the step count restored from the
    # checkpoint. The split run is the same run "crashing" after step 6 (its last checkpoint: step 4).
    base = dict(TINY, data=data, optimizer=optimizer, schedule="cosine", warmup=2, eval_every=2, steps=8, **extra)
    straight = train(TrainConfig(**base, out=str(tmp_path / "straight")))

    class Crash(Exception):
        pass

    def crash_at_step_6(info):
        if info["step"] == 6:
            raise Crash

    with pytest.raises(Crash):
        train(TrainConfig(**base, out=str(tmp_path / "split")), callback=crash_at_step_6)
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 4
    resumed = train(TrainConfig(resume=str(tmp_path / "split"), quiet=True))
    assert resumed["steps"] == 8

    a = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert a["step"] == b["step"] == 8
    _assert_same_tree(a["model"], b["model"], "model")
    _assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same_tree(a["rng"], b["rng"], "rng")          # torch, python and data-generator states
    def timeless(h):  # wall-clock seconds in eval records are the only thing allowed to differ
        return {**h, "eval": [{k: v for k, v in e.items() if k != "train_seconds"} for e in h["eval"]]}
    _assert_same_tree(timeless(a["history"]), timeless(b["history"]), "history")  # losses, grad norms, lr, evals
    assert a["tokens_seen"] == b["tokens_seen"]
    assert resumed["history"]["lr"] == straight["history"]["lr"]
    # the optimizer really carries state across the resume (else the test would prove little)
    state = a["optimizer"]["state"]
    assert state and any(isinstance(v, torch.Tensor) and v.abs().sum() > 0
                         for s in state.values() for v in s.values())


# ------------------------------------------------------------------------------------------ atomicity

_WRITER = textwrap.dedent("""
    import sys, torch
    from modula_mhc.train import save_checkpoint
    path, n = sys.argv[1], int(sys.argv[2])
    version = 0
    while True:
        # every tensor holds the version number: a torn file would mix two versions (or not load)
        payload = {"config": {}, "vocab": "ab", "step": version, "optimizer": {}, "rng": {}, "history": {},
                   "model": {f"w{i}": torch.full((n,), float(version)) for i in range(4)}}
        print("writing", version, flush=True)
        save_checkpoint(path, payload)
        print("wrote", version, flush=True)
        version += 1
""")


@pytest.mark.slow  # `make test-slow`: a long run (issue 15: fast default tier)
def test_killed_writer_never_destroys_the_previous_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a ~32 MB checkpoint in a loop, at random moments (mostly
    inside torch.save or fsync): the file on disk always loads and holds one whole version."""
    path = tmp_path / "ckpt.pt"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(0)
    last_version = -1
    killed_mid_write = 0
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(2_000_000)], stdout=subprocess.PIPE,
                                text=True, env=env)
        try:
            target = rng.randint(1, 2)  # kill while writing version `target` of this process
            while True:
                line = proc.stdout.readline()
                assert line, "writer exited early"
                word, version = line.split()
                if word == "writing" and int(version) == target:
                    time.sleep(rng.uniform(0.0, 0.15))
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        rest = proc.stdout.read()
        proc.stdout.close()
        if f"wrote {target}" not in rest:
            killed_mid_write += 1
        ckpt = load_checkpoint(path)
        v = ckpt["step"]
        assert v >= 0
        for t in ckpt["model"].values():
            assert t.numel() == 2_000_000 and bool((t == float(v)).all()), "torn checkpoint"
        assert v >= min(last_version, 0)
        last_version = v
    assert killed_mid_write >= 1, "no kill landed inside a write; the test proved nothing"
    # the next successful write removes the temporaries the killed writers left behind
    (tmp_path / ".ckpt.pt.stale.tmp").write_bytes(b"partial")
    save_checkpoint(path, _good_payload())
    assert not list(tmp_path.glob(".ckpt.pt.*.tmp")), list(tmp_path.glob(".ckpt.pt.*.tmp"))
    assert load_checkpoint(path)["step"] == 3


# ------------------------------------------------------------------------------------------ bad files

def _good_payload():
    return {"config": {}, "vocab": "ab", "step": 3, "model": {"w": torch.arange(1000.0)}, "optimizer": {},
            "rng": {}, "history": {}}


def _bad_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _good_payload())
    raw = good.read_bytes()
    files = {}
    for frac in (0.0, 0.1, 0.5, 0.95):
        p = tmp_path / f"truncated{int(frac * 100)}.pt"
        p.write_bytes(raw[:int(len(raw) * frac)])
        files[p] = "unreadable"
    p = tmp_path / "text.pt"
    p.write_text("this is a text file, not a checkpoint\n" * 20)
    files[p] = "unreadable"
    p = tmp_path / "pickle.pt"
    p.write_bytes(pickle.dumps({"format": "x", "data": list(range(10))}))
    files[p] = "unreadable"
    p = tmp_path / "zip.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "not torch")
    files[p] = "unreadable"
    p = tmp_path / "foreign_dict.pt"
    torch.save({"weight": torch.zeros(2)}, p)
    files[p] = "not a modula_mhc"
    p = tmp_path / "foreign_list.pt"
    torch.save([torch.zeros(2)], p)
    files[p] = "not a modula_mhc"
    p = tmp_path / "incomplete.pt"
    payload = _good_payload()
    del payload["optimizer"]
    save_checkpoint(p, payload)
    files[p] = "lacks optimizer"
    files[tmp_path / "missing.pt"] = "does not exist"
    return files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoint_files_give_a_clear_error_naming_the_file(tmp_path):
    for path, message in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value), e.value
        # no chained torch exception: the user sees one line, not a stack from inside torch
        assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
        assert len(str(e.value)) < 400


def test_resume_from_bad_checkpoint_via_cli_prints_one_line(tmp_path, capsys):
    """The CLI turns an unusable --resume file into 'error: ... <file> ...', exit 2, no traceback."""
    from modula_mhc import cli
    bad = tmp_path / "run" / "ckpt.pt"
    bad.parent.mkdir()
    save_checkpoint(tmp_path / "good.pt", _good_payload())
    bad.write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    for target in (str(bad), str(bad.parent)):
        assert cli.main(["train", "--resume", target, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and "unreadable" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------ integrity (issue 14)

def _tensor_data_ranges(path):
    """(start, end) byte ranges of the tensor storages inside a torch zip checkpoint."""
    ranges = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            start = info.header_offset + 30 + name_len + extra_len
            ranges.append((start, start + info.file_size))
    return ranges


def test_single_bit_flips_in_tensor_data_are_detected(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _good_payload())
    raw = good.read_bytes()
    ranges = _tensor_data_ranges(good)
    assert ranges
    rng = random.Random(0)
    for i in range(40):
        start, end = rng.choice(ranges)
        pos, bit = rng.randrange(start, end), rng.randrange(8)
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << bit
        bad = tmp_path / f"flip{i}.pt"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="corrupted|unreadable") as e:
            load_checkpoint(bad)
        assert str(bad) in str(e.value)


def test_truncated_checkpoint_message_is_complete_and_has_no_torch_advice(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _good_payload())
    for frac in (0.3, 0.9):
        bad = tmp_path / f"t{frac}.pt"
        bad.write_bytes(good.read_bytes()[:int(good.stat().st_size * frac)])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(bad)
        msg = str(e.value)
        assert "weights_only" not in msg and "\n" not in msg and msg.endswith(")"), msg
        assert "truncated" in msg


def test_output_files_have_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        train(TrainConfig(**{**TINY, "manifolds": "muon", "sample_chars": 5}, data=_text(tmp_path), steps=2,
                          eval_every=2, out=str(tmp_path / "run")))
    finally:
        os.umask(old)
    files = [f for f in os.listdir(tmp_path / "run")]
    assert {"ckpt.pt", "metrics.json", "metrics.jsonl", "loss.png", "sample.txt"} <= set(files)
    for f in files:
        assert (tmp_path / "run" / f).stat().st_mode & 0o777 == 0o644, f


def test_full_disk_during_checkpoint_write_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    import errno

    import modula_mhc.checkpoint as C
    from modula_mhc import cli
    real, calls = C._serialize, {"n": 0}

    def disk_full_on_second_write(payload, f):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(payload, f)

    monkeypatch.setattr(C, "_serialize", disk_full_on_second_write)
    out = tmp_path / "run"
    code = cli.main(["train", "--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--batch", "4",
                     "--eval-batches", "1", "--manifolds", "muon", "--steps", "4", "--eval-every", "2",
                     "--sample-chars", "0", "--quiet", "--data", _text(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and "ckpt.pt" in err, err
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert not list(out.glob(".ckpt.pt.*"))


def test_torchrun_checkpoint_resume_is_one_line_and_sample_works(tmp_path, capsys):
    """The distributed example's checkpoint (full weights, no per-rank RNG): `train --resume` says
    why it cannot continue it; `sample` reads it."""
    from modula_mhc import cli
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "manifolds": "muon"}, data=_text(tmp_path), steps=2, eval_every=2, out=str(out)))
    ckpt = load_checkpoint(out / "ckpt.pt")
    ckpt.pop("format"), ckpt.pop("checksum")
    save_checkpoint(tmp_path / "dist.pt", {**ckpt, "rng": {"data": ckpt["rng"]["data"]}, "world_size": 2})
    assert cli.main(["train", "--resume", str(tmp_path / "dist.pt"), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distributed run" in err and "modula-mhc sample" in err, err
    assert cli.main(["sample", str(tmp_path / "dist.pt"), "--chars", "10"]) == 0
    assert len(capsys.readouterr().out) == 11
