"""DualizeRetract: agreement with torch.optim.Muon, modular-norm step sizes, state_dict round trip,
schedulers, closures, zero gradients, weight decay, presets, diagnostics, and a training run."""
import copy

import pytest
import torch
from torch import nn

from modula_mhc import atoms, bonds, compounds, optim


def seeded(seed):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def polar64(X):
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


def mlp(manifold="euclidean", seed=0):
    torch.manual_seed(seed)
    return atoms.Linear(32, 4, manifold=manifold) @ bonds.ReLU() @ atoms.Linear(8, 32, manifold=manifold)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 8, generator=g)
    return X, torch.sin(X @ torch.randn(8, 4, generator=g))


def loss_of(net, X, Y):
    return ((net(X) - Y) ** 2).mean()


# ---------------------------------------------------------------------------- Muon agreement
def test_euclidean_step_is_muon_direction():
    """Same momentum convention as torch.optim.Muon (buffer lerp, Nesterov lerp); Muon orthogonalises
    with Keller Jordan's bf16 quintic (singular values ~U(0.5, 1.5)), we with Polar Express in fp32.
    So we compare the polar factors of the two weight changes (identical in exact arithmetic) to a
    tolerance set by Muon's bf16 error, and check that ours already is that polar factor."""
    seeded(0)
    lin = atoms.Linear(24, 40)
    opt = optim.DualizeRetract(lin, lr=0.1, momentum=0.9, nesterov=True)
    ref = nn.Parameter(lin.weight.detach().clone())
    muon = torch.optim.Muon([ref], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(40, 24, generator=g)
        before, ref_before = lin.weight.detach().clone(), ref.detach().clone()
        lin.weight.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        muon.step()
        ours, theirs = before - lin.weight.detach(), ref_before - ref.detach()
        assert (polar64(ours) - ours.double() / 0.1).abs().max().item() < 5e-3  # ours: lr·msign(u)
        rel = (polar64(ours) - polar64(theirs)).norm() / polar64(ours).norm()
        assert rel.item() < 3e-2, rel


# ---------------------------------------------------------------------------- modular-norm step sizes
def test_step_has_modular_norm_lr():
    net = mlp()
    X, Y = data()
    opt = optim.DualizeRetract(net, lr=0.05, momentum=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    loss_of(net, X, Y).backward()
    opt.step()
    deltas = [(b - p.detach()) / 0.05 for b, p in zip(before, net.parameters())]
    assert net.norm(deltas).item() == pytest.approx(1.0, abs=5e-3)
    targets = [d["target"] for d in opt.diagnostics().values()]
    assert targets == pytest.approx([1 / float(c) for c in net.norm_coefficients()])


def test_plain_parameters_need_atoms():
    net = mlp()
    opt = optim.DualizeRetract(net.parameters(), lr=0.1)
    assert [d["target"] for d in opt.diagnostics().values()] == [1.0, 1.0]
    with pytest.raises(ValueError, match="does not belong to a modula_mhc atom"):
        optim.DualizeRetract([nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(ValueError):
        optim.DualizeRetract(net, lr=-1.0)
    with pytest.raises(ValueError):
        optim.DualizeRetract(net, momentum=1.0)


def test_param_groups_have_their_own_lr():
    net = mlp()
    p0, p1 = list(net.parameters())
    opt = optim.DualizeRetract([{"params": [p0], "lr": 0.0}, {"params": [p1]}], lr=0.1, momentum=0.0)
    X, Y = data()
    b0, b1 = p0.detach().clone(), p1.detach().clone()
    loss_of(net, X, Y).backward()
    opt.step()
    assert torch.equal(p0.detach(), b0) and not torch.equal(p1.detach(), b1)


# ---------------------------------------------------------------------------- state and schedules
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("manifold", ["euclidean", "stiefel", "dgram"])
def test_state_dict_round_trip_is_bit_identical(manifold, dtype):
    """Also with bf16 weights: the dual solver's warm start is stored in the weight's dtype, which
    load_state_dict casts state to (it was float32, so a resumed bf16 run warm-started elsewhere)."""
    X, Y = (t.to(dtype) for t in data(1))
    net = mlp(manifold, seed=2).to(dtype)
    opt = optim.DualizeRetract(net, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss_of(net, X, Y).backward()
        opt.step()
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.zero_grad()
        loss_of(net, X, Y).backward()
        opt.step()
    expected = [p.detach().clone() for p in net.parameters()]

    net2 = mlp(manifold, seed=99).to(dtype)
    net2.load_state_dict(saved_net)
    opt2 = optim.DualizeRetract(net2, lr=0.05)
    opt2.load_state_dict(saved_opt)
    for _ in range(4):
        opt2.zero_grad()
        loss_of(net2, X, Y).backward()
        opt2.step()
    for a, b in zip(expected, net2.parameters()):
        assert torch.equal(a, b.detach())


def test_lr_scheduler_scales_the_step():
    net = atoms.Linear(16, 16)
    opt = optim.DualizeRetract(net, lr=0.2, momentum=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(3)
    for lr in (0.2, 0.1, 0.05):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        before = net.weight.detach().clone()
        net.weight.grad = torch.randn(16, 16, generator=g)
        opt.step()
        sched.step()
        step = torch.linalg.matrix_norm((before - net.weight.detach()).double(), ord=2).item()
        assert step == pytest.approx(lr, rel=5e-3)


def test_closure_and_zero_grad():
    net = mlp()
    X, Y = data()
    opt = optim.DualizeRetract(net, lr=0.05)
    before = loss_of(net, X, Y).item()

    def closure():
        opt.zero_grad()
        loss = loss_of(net, X, Y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(before)  # the closure ran at the pre-step weights
    assert loss_of(net, X, Y).item() < before  # and its gradient was used
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("manifold", ["euclidean", "stiefel", "dgram", "oblique"])
def test_zero_gradients_do_not_move_or_nan(manifold):
    net = mlp(manifold)
    opt = optim.DualizeRetract(net, lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, net.parameters()):
        assert torch.isfinite(p).all()
        assert (b - p.detach()).abs().max().item() < 1e-5
    assert all(d["tangent_residual"] == 0.0 or d["tangent_residual"] < 1e-7 for d in opt.diagnostics().values())


def test_nonfinite_gradients_raise_or_skip():
    net = mlp("stiefel")
    X, Y = data()
    loss_of(net, X, Y).backward()
    next(net.parameters()).grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError):
        optim.DualizeRetract(net, lr=0.1, nonfinite="raise").step()
    opt = optim.DualizeRetract(net, lr=0.1)  # default: skip and warn
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert opt.skipped_steps == 1
    assert opt.state_dict()["skipped_steps"] == 1
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))
    ignoring = optim.DualizeRetract(net, lr=0.1, nonfinite="ignore")  # no check: the step runs
    ignoring.step()
    assert ignoring.skipped_steps == 0
    with pytest.raises(ValueError):
        optim.DualizeRetract(net, nonfinite="maybe")


def test_weight_decay_only_on_scalable_manifolds():
    for manifold, shrinks in (("euclidean", True), ("dgram", True), ("stiefel", False)):
        lin = atoms.Linear(12, 12, manifold=manifold)
        opt = optim.DualizeRetract(lin, lr=0.1, weight_decay=0.5, momentum=0.0)
        before = lin.weight.detach().clone()
        lin.weight.grad = torch.zeros_like(lin.weight)
        opt.step()
        ratio = (lin.weight.detach().norm() / before.norm()).item()
        assert ratio == pytest.approx(0.95 if shrinks else 1.0, abs=1e-5), manifold


# ---------------------------------------------------------------------------- presets and diagnostics
def test_presets_follow_roles():
    """The one preset table drives the GPT's manifolds (the training config's path) by role."""
    attn, mlp_m = optim.PRESETS["hetero-inv"][:2]
    net = compounds.GPT(11, 8, 16, 1, 2, attn_manifold=attn, mlp_manifold=mlp_m)
    roles = {a.role: a.manifold.name for a in net.atoms()}
    assert roles["attn_q"] == roles["attn_o"] == "dgram"
    assert roles["mlp_in"] == roles["mlp_out"] == "stiefel"
    assert roles["embed"] == roles["head"] == "euclidean"
    for a in net.atoms():
        assert a.manifold.contains(a.weight, tol=1e-4) or a.manifold.name == "euclidean"
        choice = optim.manifold_for_role("hetero-inv", a.role)
        assert choice is None or choice == a.manifold.name
    assert optim.manifold_for_role("all-dgram", None) == "dgram" and optim.manifold_for_role("hetero", None) is None
    atom = next(a for a in net.atoms() if a.role == "mlp_in")
    atom.set_manifold("oblique")  # one atom moved by hand: its weight is retracted onto the new manifold
    assert atom.manifold.name == "oblique" and atom.manifold.contains(atom.weight, tol=1e-4)
    assert optim.manifold_for_role("all-stiefel", "hyper_pre") is None  # hyper-connection atoms are kept
    with pytest.raises(ValueError, match="unknown manifold preset"):
        optim.manifold_for_role("sideways", "attn_q")


def test_diagnostics_report_dual_iterations_and_scales():
    net = mlp("dgram")
    X, Y = data()
    opt = optim.DualizeRetract(net, lr=0.05)
    loss_of(net, X, Y).backward()
    opt.step()
    diag = opt.diagnostics()
    assert len(diag) == 2
    for d in diag.values():
        assert d["manifold"] == "dgram" and d["iterations"] >= 1
        assert d["tangent_residual"] < 1e-4 and d["column_norm_spread"] >= 1.0
        assert d["top_singular_value"] > 0


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("preset", ["muon", "all-stiefel", "all-dgram"])
def test_training_lowers_the_loss(preset):
    # depth 2: no square hidden matrix, whose DGram dual runs to its cap (see docs/manifolds.md)
    net = compounds.MLP(8, 4, 32, 2, manifold=optim.PRESETS[preset][1])  # MLP atoms take the preset's MLP manifold
    X, Y = data(5)
    opt = optim.DualizeRetract(net, lr=0.1)
    first = loss_of(net, X, Y).item()
    for _ in range(40):
        opt.zero_grad()
        loss_of(net, X, Y).backward()
        opt.step()
    last = loss_of(net, X, Y).item()
    print(f"{preset}: loss {first:.4f} -> {last:.4f}")
    assert last < 0.7 * first
    for a in net.atoms():
        assert a.manifold.contains(a.weight, tol=1e-4)
