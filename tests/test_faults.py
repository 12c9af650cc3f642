"""Numerical faults: non-finite, zero, tiny and huge gradients, and bf16 autocast.

* NaN/Inf gradients injected at random steps never reach the weights: the step is skipped and
  counted with a warning (policy "skip", the default) or raises FloatingPointError ("raise") — in
  DistributedDualizeRetract (any world size, here 1) and in the training loop.
* Zero, 1e-30 and 1e30 gradients (fp32 and bf16): dualize gives a finite direction of norm 1
  (0 for a zero gradient) that does not depend on the scale, and the step stays on the manifold
  for Euclidean, Stiefel, DGram, Oblique, Sphere and Birkhoff — alone and through the optimizer.
* bf16 autocast forward, fp32 weights and manifold arithmetic: a short run matches fp32 loss within
  the tolerance measured below.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from modula_mhc import atoms, bonds, manifolds
from modula_mhc.distributed import DistributedDualizeRetract
from modula_mhc.optim import DualizeRetract

MANIFOLDS = ["euclidean", "stiefel", "dgram", "oblique", "sphere", "birkhoff"]
SCALES = [0.0, 1e-30, 1e30]

pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(name):
    return [(6, 6)] if name == "birkhoff" else [(12, 5), (5, 12)]


def _point(name, shape, seed=0):
    return manifolds.get(name).random(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ extreme gradients

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MANIFOLDS)
def test_extreme_gradients_give_finite_unit_directions_and_stay_on_manifold(name, dtype):
    m = manifolds.get(name)
    for shape in _shapes(name):
        W = _point(name, shape)
        assert m.contains(W)
        G0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        ref = m.dualize(W, G0)
        for scale in SCALES:
            G = (G0 * scale).to(dtype)
            if scale and dtype == torch.float32:
                assert torch.isfinite(G).all() and (G != 0).any()
            A = m.dualize(W.to(dtype), G).float()
            assert torch.isfinite(A).all(), (name, shape, scale, dtype)
            norm = float(m.norm(A))
            if scale == 0.0:
                assert norm == 0.0, (name, scale)  # a zero gradient moves nothing (and is not NaN)
            else:
                assert norm == pytest.approx(1.0, abs=2e-2 if dtype == torch.bfloat16 else 2e-3), (name, shape, scale)
                if dtype == torch.float32:  # dualize is scale-free: the same direction at any scale
                    assert (A - ref).abs().max().item() < 1e-3, (name, shape, scale)
            W2 = m.step(W, A, 0.1)
            assert torch.isfinite(W2).all()
            assert m.contains(W2, tol=1e-4), (name, shape, scale)


def _manifold_zoo():
    """One Linear atom per manifold, composed (square 6x6 for Birkhoff)."""
    torch.manual_seed(0)
    return (atoms.Linear(6, 3, manifold="euclidean") @ bonds.ReLU() @ atoms.Linear(6, 6, manifold="birkhoff")
            @ atoms.Linear(5, 6, manifold="sphere") @ atoms.Linear(12, 5, manifold="oblique")
            @ atoms.Linear(5, 12, manifold="dgram") @ atoms.Linear(7, 5, manifold="stiefel"))


@pytest.mark.parametrize("opt_cls", [DualizeRetract, DistributedDualizeRetract])
def test_optimizer_with_extreme_gradients_keeps_every_atom_on_its_manifold(opt_cls):
    net = _manifold_zoo()
    opt = opt_cls(net, lr=0.1, momentum=0.9)
    rng = torch.Generator().manual_seed(2)
    for step, scale in enumerate([1e30, 1e-30, 0.0, 1e30, 1.0, 1e-30]):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=rng) * scale
        opt.step()
        for a in net.atoms():
            assert torch.isfinite(a.weight).all(), (step, a.manifold.name)
            assert a.manifold.contains(a.weight, tol=1e-4), (step, a.manifold.name)
    y = net(torch.randn(4, 7))
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------ non-finite gradients

def _loss(net, seed):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(8, 7, generator=g), torch.randint(0, 3, (8,), generator=g)
    return F.cross_entropy(net(x), t)


def _run(policy, bad_steps, steps=12):
    """Train the zoo; at ``bad_steps`` one random gradient entry becomes NaN, +Inf or -Inf."""
    net = _manifold_zoo()
    opt = DistributedDualizeRetract(net, lr=0.05, momentum=0.9, nonfinite=policy)
    rng = random.Random(3)
    for step in range(steps):
        opt.zero_grad()
        _loss(net, step).backward()
        if step in bad_steps:
            p = rng.choice(list(net.parameters()))
            p.grad.view(-1)[rng.randrange(p.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        opt.step()
        for w in net.parameters():
            assert torch.isfinite(w).all(), f"non-finite weight after step {step}"
    return net, opt


def test_nonfinite_gradients_are_skipped_counted_and_warned():
    bad = set(random.Random(4).sample(range(12), 4))
    with pytest.warns(RuntimeWarning, match="non-finite gradient") as record:
        net, opt = _run("skip", bad)
    assert opt.skipped_steps == len(bad) == len([w for w in record if "non-finite" in str(w.message)])
    # a skipped step changes nothing: the same as a run whose bad steps never happened
    clean = _manifold_zoo()
    opt2 = DualizeRetract(clean, lr=0.05, momentum=0.9)
    for step in range(12):
        opt2.zero_grad()
        loss = _loss(clean, step)
        if step in bad:
            continue
        loss.backward()
        opt2.step()
    for p, q in zip(net.parameters(), clean.parameters()):
        assert torch.equal(p, q)
    # and the momentum buffers never saw a NaN
    for s in opt.state.values():
        assert all(torch.isfinite(v).all() for v in s.values() if isinstance(v, torch.Tensor))
    # the count survives a checkpoint
    opt3 = DistributedDualizeRetract(_manifold_zoo(), lr=0.05)
    opt3.load_state_dict(opt.state_dict())
    assert opt3.skipped_steps == len(bad)


def test_nonfinite_gradient_raises_with_policy_raise():
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run("raise", {5})
    # the weights before the bad step are intact (the raise happens before any update)
    net, _ = _run("raise", set(), steps=5)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_plain_optimizer_has_a_nonfinite_policy():
    net = _manifold_zoo()
    opt = DualizeRetract(net, lr=0.05, nonfinite="skip")
    _loss(net, 0).backward()
    next(net.parameters()).grad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert opt.skipped_steps == 1
    with pytest.raises(FloatingPointError):
        DualizeRetract(net, lr=0.05, nonfinite="raise").step()


def _tiny_config(tmp_path, name, **kw) -> dict:
    """TrainConfig fields of a seconds-long run writing to tmp_path/name."""
    from modula_mhc.data import default_corpus
    data = tmp_path / "text.txt"
    if not data.exists():
        data.write_text(default_corpus()[:30_000])
    cfg = dict(width=32, depth=1, heads=2, context=16, batch=4, eval_batches=2, sample_chars=0, quiet=True,
               data=str(data), out=str(tmp_path / name))
    cfg.update(kw)
    return cfg


def test_training_loop_skips_injected_nonfinite_gradients(tmp_path):
    from modula_mhc.train import TrainConfig, load_checkpoint, train
    cfg = _tiny_config(tmp_path, "skip", steps=10, eval_every=10)
    bad = {2, 3, 7}
    calls = {"n": 0}

    def inject(info):  # called at the step-0 evaluation: poison the gradient at chosen steps
        if info["step"] != 0:
            return
        p = next(info["model"].parameters())

        def hook(g):
            calls["n"] += 1
            return g * math.nan if calls["n"] - 1 in bad else g
        p.register_hook(hook)

    with pytest.warns(RuntimeWarning, match="step skipped"):
        metrics = train(TrainConfig(**cfg), callback=inject)
    assert metrics["skipped_steps"] == len(bad)
    ckpt = load_checkpoint(tmp_path / "skip" / "ckpt.pt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert all(math.isfinite(v) for v in metrics["history"]["train_loss"] if v == v)

    with pytest.raises(FloatingPointError, match="non-finite"):
        calls["n"] = 0
        train(TrainConfig(**_tiny_config(tmp_path, "raise", steps=10, eval_every=10, nonfinite="raise")),
              callback=inject)


# ------------------------------------------------------------------------------ bf16 autocast

@pytest.mark.slow  # `make test-slow`: a long run (issue 15: fast default tier)
def test_bf16_autocast_matches_fp32_loss(tmp_path):
    """40 steps of the tiny GPT (Stiefel/DGram atoms) with a bf16 autocast forward vs fp32.
    Measured (2 seeds, `python -m pytest tests/test_faults.py -k bf16`, width 32, 40 steps): max
    per-step |Δloss| 1.0e-3 / 1.2e-3 nats, final val |Δ| 5e-5 / 5e-4 nats. Tolerances: 10x."""
    from modula_mhc.train import TrainConfig, load_checkpoint, train
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = train(TrainConfig(**_tiny_config(tmp_path, dtype, width=32, context=32, batch=8, eval_batches=4,
                                                      steps=40, eval_every=20, dtype=dtype)))
    a, b = runs["float32"]["history"]["train_loss"], runs["bfloat16"]["history"]["train_loss"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    assert max(diffs) > 0, "bf16 autocast changed nothing: was it active?"
    assert max(diffs) < 1.5e-2, max(diffs)
    assert abs(runs["float32"]["final"]["val_loss"] - runs["bfloat16"]["final"]["val_loss"]) < 1e-2
    assert runs["bfloat16"]["final"]["val_loss"] < runs["bfloat16"]["initial"]["val"] - 1.0  # it trained
    # weights and optimizer state stay fp32 and on their manifolds
    ckpt = load_checkpoint(tmp_path / "bfloat16" / "ckpt.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())


# ------------------------------------------------------------------------------ CLI bad input
# (tests/test_train_cli.py covers missing, empty, NUL-byte and non-UTF-8 files and most flags)

@pytest.mark.parametrize("make_args, mentioned", [
    (lambda tmp: ["--data", str(tmp)], "{tmp}"),                    # a directory, not a file
    (lambda tmp: ["--data", ""], "--data"),
    (lambda tmp: ["--nonfinite", "ignore"], "--nonfinite"),
    (lambda tmp: ["--bogus-flag", "3"], "--bogus-flag"),
    (lambda tmp: ["--momentum", "1.5"], "--momentum"),
    (lambda tmp: ["--streams", "0", "--residual", "mhc"], "--streams"),
])
def test_cli_rejects_more_bad_input_without_traceback(tmp_path, capsys, make_args, mentioned):
    from modula_mhc import cli
    try:
        code = cli.main(["train", *make_args(tmp_path), "--steps", "1", "--out", str(tmp_path / "run")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert mentioned.format(tmp=tmp_path) in err and "Traceback" not in err
