"""Adversarial audit of the optimizer protocol and of training safety.

* torch.optim protocol of DualizeRetract and DualizeAdamW: a state dict that went through
  torch.save / torch.load(weights_only=True) continues bit-identically (Muon and Hetero GPTs); a
  state dict of another model's shapes is refused at load (torch only compares parameter counts);
  per-group hyperparameters, parameters listed twice and non-atom parameters are refused before
  anything is added; schedulers set the measured step size; hooks, closures, zero_grad, grad=None.
* training: a run that fails before its first step leaves nothing that blocks a rerun; a resumed
  run refuses other text under the checkpoint's data path and accepts the same text by another
  path; a Ctrl-C at a step between evaluations resumes into the uninterrupted run exactly; UTF-8
  data on an ASCII terminal prints escapes instead of a traceback.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import warnings

import pytest
import torch
from torch import nn

import modula_mhc as mm
from modula_mhc import atoms, bonds, cli, compounds, optim
from modula_mhc.checkpoint import load_checkpoint
from modula_mhc.train import ConfigError, Interrupted, TrainConfig, train

VOCAB, CONTEXT = 12, 8


def gpt(manifolds="muon", width=16, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    attn, mlp = optim.PRESETS[manifolds][:2]
    return compounds.GPT(vocab, CONTEXT, width, 1, 2, attn_manifold=attn, mlp_manifold=mlp)


def mlp(manifold="euclidean", seed=0):
    torch.manual_seed(seed)
    return atoms.Linear(32, 4, manifold=manifold) @ bonds.ReLU() @ atoms.Linear(8, 32, manifold=manifold)


def make(kind, net, **kw):
    return mm.adapt.DualizeAdamW(net, lr=0.05, **kw) if kind == "dualize-adamw" else optim.DualizeRetract(net, lr=0.05, **kw)


def train_steps(net, opt, seeds, vocab=VOCAB):
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        x = torch.randint(0, vocab, (3, CONTEXT + 1), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[:, :-1]).reshape(-1, vocab), x[:, 1:].reshape(-1)).backward()
        opt.step()


# ------------------------------------------------------------------------------------------ state dicts

@pytest.mark.parametrize("kind", ["dualize-retract", "dualize-adamw"])
@pytest.mark.parametrize("manifolds", ["muon", "hetero"])
def test_state_dict_through_torch_save_continues_bit_identically(manifolds, kind):
    net = gpt(manifolds)
    opt = make(kind, net)
    train_steps(net, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    train_steps(net, opt, range(3, 6))
    expected = [p.detach().clone() for p in net.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = gpt(manifolds, seed=7)
    net2.load_state_dict(saved["model"])
    opt2 = make(kind, net2)
    opt2.load_state_dict(saved["opt"])
    train_steps(net2, opt2, range(3, 6))
    for a, b in zip(expected, net2.parameters()):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("kind", ["dualize-retract", "dualize-adamw"])
@pytest.mark.parametrize("manifolds, momentum", [("muon", 0.95), ("hetero", 0.95), ("hetero", 0.0)])
def test_state_dict_of_other_shapes_is_refused_at_load(manifolds, momentum, kind):
    """torch.optim only compares parameter counts: the state of a wider model loaded silently and
    failed at the next step with a broadcast error. Now: ValueError at load, nothing changed."""
    net = gpt(manifolds)
    opt = make(kind, net, momentum=momentum)
    train_steps(net, opt, range(1))
    other = gpt(manifolds, width=32)
    opt2 = make(kind, other, momentum=momentum)
    with pytest.raises(ValueError, match="does not fit this model.*shape"):
        opt2.load_state_dict(opt.state_dict())
    assert not opt2.state and opt2.skipped_steps == 0
    train_steps(other, opt2, range(1))  # still usable


def test_state_dict_of_transposed_shapes_is_refused():
    a = atoms.Linear(16, 8) @ bonds.ReLU() @ atoms.Linear(8, 16)
    b = atoms.Linear(8, 16) @ bonds.ReLU() @ atoms.Linear(16, 8)
    opt = optim.DualizeRetract(a)
    for p in a.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match="momentum_buffer"):
        optim.DualizeRetract(b).load_state_dict(opt.state_dict())


# ------------------------------------------------------------------------------------------ misuse

@pytest.mark.parametrize("group, key", [
    ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": True}, "lr"), ({"momentum": 1.5}, "momentum"),
    ({"momentum": 1.0}, "momentum"), ({"weight_decay": float("nan")}, "weight_decay"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_param_group_hyperparameters_are_checked(group, key):
    """Per-group values were taken as given (a negative lr stepped uphill, momentum 1.5 diverged)."""
    net = mlp()  # atoms are held weakly: the module must outlive the optimizer's construction
    p0, p1 = net.parameters()
    with pytest.raises(ValueError, match=key):
        optim.DualizeRetract([{"params": [p0], **group}, {"params": [p1]}])
    opt = optim.DualizeRetract([p0])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [p1], **group})
    assert len(opt.param_groups) == 1  # nothing was added


@pytest.mark.parametrize("kwargs", [dict(lr=-0.1), dict(lr=True), dict(momentum=1.0), dict(momentum=-0.5),
                                    dict(weight_decay=float("inf")), dict(nonfinite="maybe")])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        optim.DualizeRetract(mlp(), **kwargs)


def test_a_parameter_listed_twice_is_refused():
    """torch only warns, and the parameter was then stepped twice per step (momentum too)."""
    net = mlp()  # atoms are held weakly: the module must outlive the optimizer's construction
    p0, p1 = net.parameters()
    with pytest.raises(ValueError, match="more than once"):
        optim.DualizeRetract([p0, p0, p1])
    with pytest.raises(ValueError, match="more than one"):
        optim.DualizeRetract([{"params": [p0]}, {"params": [p0, p1]}])
    opt = optim.DualizeRetract([p0])
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p1, p1]})


def test_a_non_atom_parameter_group_is_refused_before_it_is_added():
    """The group used to be added before the check raised: a later step hit a KeyError."""
    net = mlp()  # atoms are held weakly: the module must outlive the optimizer's construction
    p0, p1 = net.parameters()
    opt = optim.DualizeRetract([p0])
    stray = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="atom"):
        opt.add_param_group({"params": [stray]})
    assert len(opt.param_groups) == 1
    stray.grad = torch.randn(3, 3)
    p0.grad = torch.randn_like(p0)
    opt.step()


def test_no_parameters_is_refused():
    with pytest.raises(ValueError):
        optim.DualizeRetract([])
    with pytest.raises(ValueError, match="no atoms"):
        optim.DualizeRetract(bonds.ReLU())


def test_generator_params_and_added_groups_with_their_own_lr():
    net = mlp()
    p0, p1 = net.parameters()
    opt = optim.DualizeRetract((p for p in [p0]), lr=0.1, momentum=0.0)
    opt.add_param_group({"params": (p for p in [p1]), "lr": 0.0})
    before = p1.detach().clone()
    p0.grad, p1.grad = torch.randn_like(p0), torch.randn_like(p1)
    opt.step()
    assert torch.equal(before, p1.detach())  # lr 0 in its own group
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]


# ------------------------------------------------------------------------------------------ protocol

@pytest.mark.parametrize("manifold", ["euclidean", "stiefel"])
@pytest.mark.parametrize("scheduler", ["lambda", "step", "onecycle", "cosine"])
def test_schedulers_set_the_measured_step_size(scheduler, manifold):
    net = atoms.Linear(16, 16, manifold=manifold)
    opt = optim.DualizeRetract(net, lr=0.2, momentum=0.0)
    sched = {"lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e),
             "step": lambda: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
             "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=6),
             "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)}[scheduler]()
    g = torch.Generator().manual_seed(0)
    lrs = []
    for _ in range(4):
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        before = net.weight.detach().clone()
        net.weight.grad = torch.randn(16, 16, generator=g)
        opt.step()
        sched.step()
        moved = torch.linalg.matrix_norm((before - net.weight.detach()).double(), ord=2).item()
        assert moved == pytest.approx(lr, rel=3e-2)  # Stiefel: the retraction shortens the step by < 2%
    assert len(set(round(x, 6) for x in lrs)) > 1


def test_grad_none_is_skipped_and_zero_grad_both_ways():
    net = mlp()
    p0, p1 = net.parameters()
    opt = optim.DualizeRetract(net, weight_decay=0.5)
    before = p1.detach().clone()
    p0.grad = torch.randn_like(p0)
    opt.step()
    assert torch.equal(before, p1.detach()) and p1 not in opt.state  # not moved, not even decayed
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("kind", ["dualize-retract", "dualize-adamw"])
def test_hooks_fire_once_in_order_and_closure_returns_the_loss(kind):
    net = mlp()
    opt = make(kind, net)
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: events.append("post"))
    opt.register_state_dict_pre_hook(lambda o: events.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: events.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: events.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: events.append("load_post"))
    X = torch.randn(4, 8)

    def closure():
        opt.zero_grad()
        loss = net(X).square().mean()
        loss.backward()
        events.append("closure")
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    opt.load_state_dict(opt.state_dict())
    assert events == ["pre", "closure", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_inf_gradient_skips_or_raises_as_documented():
    net = mlp("stiefel")
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    next(net.parameters()).grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in net.parameters()]
    opt = optim.DualizeRetract(net)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))
    with pytest.raises(FloatingPointError):
        optim.DualizeRetract(net, nonfinite="raise").step()
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))


# ------------------------------------------------------------------------------------------ training

TINY = dict(width=32, depth=1, heads=2, context=16, batch=4, eval_batches=1, sample_chars=0, quiet=True)
TINY_FLAGS = ["--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--batch", "4",
              "--eval-batches", "1", "--quiet"]


@pytest.fixture
def text_file(tmp_path):
    from modula_mhc.data import default_corpus
    p = tmp_path / "text.txt"
    p.write_text(default_corpus()[:20_000])
    return str(p)


def test_out_of_memory_at_the_first_step_is_one_line_and_blocks_no_rerun(tmp_path, capsys, text_file, monkeypatch):
    """A first step that runs out of memory (too big a --batch) was a traceback, and its empty
    metrics.jsonl made the directory "hold a run": the corrected rerun was refused."""
    real = optim.DualizeRetract.step

    def oom(self, closure=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(optim.DualizeRetract, "step", oom)
    out = tmp_path / "run"
    args = ["train", *TINY_FLAGS, "--data", text_file, "--steps", "2", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err
    assert not out.exists()
    monkeypatch.setattr(optim.DualizeRetract, "step", real)
    assert cli.main(args) == 0


def test_a_failure_after_logged_steps_keeps_the_log(tmp_path, text_file, monkeypatch):
    """Only a log without steps is dropped: one with steps is the record of a run (refused, not lost)."""
    real, calls = optim.DualizeRetract.step, {"n": 0}

    def fails_at_step_3(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("some bug")
        return real(self, closure)

    monkeypatch.setattr(optim.DualizeRetract, "step", fails_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="some bug"):
        train(TrainConfig(**TINY, data=text_file, steps=8, eval_every=8, out=str(out)))
    log = (out / "metrics.jsonl").read_text()
    assert '"kind": "step"' in log
    monkeypatch.setattr(optim.DualizeRetract, "step", real)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(**TINY, data=text_file, steps=2, out=str(out)))


def test_resume_refuses_other_text_under_the_same_path_and_accepts_the_same_text_elsewhere(tmp_path, text_file):
    base = dict(TINY, data=text_file, eval_every=2)
    train(TrainConfig(**base, steps=2, out=str(tmp_path / "run")))
    original = open(text_file, encoding="utf-8").read()
    lines = original.split("\n")
    open(text_file, "w", encoding="utf-8").write("\n".join(reversed(lines)))  # same characters, other text
    with pytest.raises(ConfigError, match="is not the text checkpoint"):
        train(TrainConfig(resume=str(tmp_path / "run"), steps=4, quiet=True))
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 2  # untouched
    moved = tmp_path / "moved.txt"
    moved.write_text(original, encoding="utf-8")
    m = train(TrainConfig(resume=str(tmp_path / "run"), data=str(moved), steps=4, quiet=True))
    assert m["steps"] == 4 and m["config"]["data"] == str(moved)


def test_ctrl_c_between_evaluations_resumes_into_the_uninterrupted_run(tmp_path, text_file, monkeypatch):
    import modula_mhc.train as T
    base = dict(TINY, data=text_file, eval_every=4, steps=8, schedule="cosine", warmup=1)
    straight = train(TrainConfig(**base, out=str(tmp_path / "straight")))

    real = T._Run.record_step

    def ctrl_c_at_step_3(self, *args):
        real(self, *args)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the loop finishes step 3, checkpoints it and stops

    monkeypatch.setattr(T._Run, "record_step", ctrl_c_at_step_3)
    with pytest.raises(Interrupted):
        train(TrainConfig(**base, out=str(tmp_path / "split")))
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(T._Run, "record_step", real)
    resumed = train(TrainConfig(resume=str(tmp_path / "split"), quiet=True))
    assert resumed["history"]["train_loss"] == straight["history"]["train_loss"]
    a, b = load_checkpoint(tmp_path / "straight" / "ckpt.pt"), load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_utf8_data_trains_resumes_and_prints_on_an_ascii_terminal(tmp_path, monkeypatch):
    text = "héllo wörld — ñandú 🦙 日本語テキスト。\r\nΣίσυφος κ' ἡ πέτρα.\n" * 40
    data = tmp_path / "utf8.txt"
    data.write_text(text, encoding="utf-8")
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", ascii_out)
    out = tmp_path / "run"
    flags = [f for f in TINY_FLAGS if f != "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", *flags, "--data", str(data), "--steps", "2", "--eval-every", "1",
                         "--sample-chars", "40", "--out", str(out)]) == 0
        assert cli.main(["sample", str(out), "--chars", "40"]) == 0
    printed = ascii_out.buffer.getvalue().decode("ascii")
    assert "--- sample (40 chars) ---" in printed and "\\u" in printed  # escaped, not a traceback
    assert ascii_out.errors == "strict"  # the CLI put the stream back
    assert len((out / "sample.txt").read_text(encoding="utf-8")) == 40
    vocab = load_checkpoint(out / "ckpt.pt")["vocab"]
    assert "🦙" in vocab and "日" in vocab
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    assert train(TrainConfig(resume=str(out), steps=3, quiet=True))["steps"] == 3
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["status"] == "completed"


def test_dualize_adamw_refuses_adamw_state_of_other_shapes():
    """DualizeAdamW's AdamW part (embeddings and vectors of an adapted model) is shape-checked too:
    a state dict from a model with another vocabulary raises, and nothing is loaded."""
    from modula_mhc.adapt.optim import DualizeAdamW

    def adapted(vocab):
        torch.manual_seed(0)
        return mm.adapt(nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, vocab)))

    small, large = adapted(10), adapted(12)
    saved_opt, target_opt = DualizeAdamW(small), DualizeAdamW(large)
    small(torch.randint(0, 10, (4,))).sum().backward()
    saved_opt.step()
    before = target_opt.state_dict()
    with pytest.raises(ValueError, match="does not fit this model"):
        target_opt.load_state_dict(saved_opt.state_dict())
    assert target_opt.state_dict()["adamw"]["state"] == before["adamw"]["state"] == {}
