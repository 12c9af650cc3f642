"""Hyper-connections (HC / mHC): orientation, reductions, gradients, stability, metadata, training."""
import copy
import math

import pytest
import torch

from modula_mhc import atoms, bonds, compounds, kernels
from modula_mhc.algebra import Compose
from modula_mhc.atoms.mix import Gate, Mix, StaticCoefficients
from modula_mhc.compounds import stability_report
from modula_mhc.compounds.hyper import (
    CollapseStreams,
    ExpandStreams,
    HyperConnections,
    residual_init_logit,
)

from _claims import random_like_params, scale_to, seq_norm, unit_rms

SLACK = 1 + 1e-6


def _branch(width=8):
    return atoms.Linear(width, width) @ bonds.GELU() @ atoms.Linear(width, width) @ bonds.RMSNorm()


def _x(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return unit_rms(torch.randn(shape, generator=g, dtype=dtype))


def _randomise_coefficients(hc, seed=0, logit_std=1.0, gates=1.0):
    """Move the coefficient atoms away from their (symmetric) init, keeping them well-normed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = hc.static.weight
        w.add_(logit_std * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w))
        if hc.dynamic:
            hc.gate.weight.copy_(gates * torch.sign(torch.randn(hc.gate.weight.shape, generator=g)).to(w))
    return hc


def _hand_written(hc, x):
    """out_i = ρ Σ_j H[i, j] x_j + β p_i F(Σ_j q_j x_j), one stream at a time."""
    q, p, H = hc.coefficients(x)
    n = hc.streams
    u = sum(q[..., j, None].to(x.dtype) * x[..., j, :] for j in range(n))
    f = hc.branch(u)
    outs = []
    for i in range(n):
        mix = sum(H[..., i, j, None].to(x.dtype) * x[..., j, :] for j in range(n))
        outs.append(hc.residual_scale * mix + hc.branch_scale * p[..., i, None].to(x.dtype) * f)
    return torch.stack(outs, dim=-2), H


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_mixing_orientation_matches_per_stream_loop(constrained, dynamic):
    torch.manual_seed(0)
    hc = HyperConnections(_branch(), streams=3, constrained=constrained, dynamic=dynamic, depth=4).double()
    _randomise_coefficients(hc, logit_std=1.5)
    cycle = 4.0 * torch.roll(torch.eye(3, dtype=torch.float64), 1, dims=1)  # strongly asymmetric mixing
    with torch.no_grad():
        if constrained and not dynamic:
            hc.mix.weight.copy_(kernels.sinkhorn(cycle, tol=1e-10))
        else:
            hc.static.weight[6:] = (cycle if constrained else cycle / 4).flatten()
    x = _x((2, 5, 3, 8))
    ref, H = _hand_written(hc, x)
    torch.testing.assert_close(hc(x), ref)
    # the transposed mixing must give a different answer (H is not symmetric here)
    assert (H - H.mT).abs().max() > 1e-2
    q, p, _ = hc.coefficients(x)
    wrong = kernels.mhc_post_res(x, hc.branch(kernels.mhc_pre(x, q)), hc.residual_scale * H.mT, hc.branch_scale * p)
    assert (wrong - ref).abs().max() > 1e-3


def test_streams_one_is_a_plain_residual():
    torch.manual_seed(1)
    hc = HyperConnections(_branch(), streams=1, depth=None).double()
    _randomise_coefficients(hc, seed=3)
    x = _x((2, 6, 1, 8))
    # hand-written: h̃ = α·(x̃ φ) + b; h_pre = 1 (one stream: no pre-mix), h_post = 2σ, H_res = Sinkhorn(1×1) = 1
    xt = x[..., 0, :] / x[..., 0, :].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    z = (xt @ hc.phi.weight.T) * hc.phi.gain
    h = hc.gate.scale * hc.gate.weight[hc.gate.index] * z + hc.static.weight
    h_post = 2 * torch.sigmoid(h[..., 1:2])
    expected = x[..., 0, :] + h_post * hc.branch(x[..., 0, :])
    torch.testing.assert_close(hc(x)[..., 0, :], expected)
    assert torch.allclose(hc.coefficients(x)[2], torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("dynamic", [True, False])
def test_streams_one_mhc_starts_as_exactly_the_plain_residual(dynamic):
    """A branch that is not scale-invariant (a plain Linear): h_pre = σ(0) = 1/2 gave x + F(x/2),
    wrong by 1.2–1.7 here; with one stream h_pre ≡ 1 (docs/mhc.md) and the layer is x + F(x)."""
    torch.manual_seed(0)
    hc = HyperConnections(atoms.Linear(8, 8), streams=1, dynamic=dynamic).double()
    if dynamic:
        with torch.no_grad():
            hc.gate.weight.zero_()
    x = _x((5, 8), seed=2)
    xs = ExpandStreams(1)(x)
    assert torch.equal(hc.coefficients(xs)[0], torch.ones(5, 1, dtype=torch.float64))
    torch.testing.assert_close(CollapseStreams(1)(hc(xs)), x + hc.branch(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_frozen_coefficients_still_give_x_and_branch_gradients(constrained, dynamic):
    """With every coefficient parameter frozen (requires_grad=False) the backward still reaches x and
    the branch (before: RuntimeError from autograd.grad with no inputs, for static HC and mHC)."""
    torch.manual_seed(0)
    hc = _randomise_coefficients(HyperConnections(_branch(), streams=3, constrained=constrained,
                                                  dynamic=dynamic, depth=4).double())
    grads = []
    for freeze in (False, True):
        for name, p in hc.named_parameters():
            p.grad = None
            p.requires_grad_(not (freeze and not name.startswith("branch")))
        x = _x((2, 5, 3, 8)).requires_grad_()
        hc(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for name, p in hc.named_parameters() if name.startswith("branch")])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for name, p in hc.named_parameters() if not name.startswith("branch"))


def test_init_is_near_identity_and_network_starts_as_plain_residual():
    n = 4
    hc = HyperConnections(_branch(), streams=n).double()
    tau = residual_init_logit(n, 0.95)
    assert math.exp(tau) / (math.exp(tau) + n - 1) == pytest.approx(0.95)
    x = ExpandStreams(n)(_x((2, 5, 8)))  # identical streams, as after the expansion
    q, p, H = hc.coefficients(x)
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    assert diag.min() >= 0.945, diag.min()  # not the 0.475 of τ = 1
    assert (q.sum(-1) - 1).abs().max() < 0.02 and (p - 1).abs().max() < 0.02
    # with the gates at 0 the expanded stack computes exactly x + F(x)
    with torch.no_grad():
        hc.gate.weight.zero_()
    y = CollapseStreams(n)(hc(x))
    torch.testing.assert_close(y, x[..., 0, :] + hc.branch(x[..., 0, :]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        HyperConnections(_branch(), streams=0)
    with pytest.raises(ValueError):
        HyperConnections(bonds.RMSNorm(), streams=2)  # width unknown
    hc = HyperConnections(_branch(), streams=2)
    with pytest.raises(ValueError):
        hc(torch.randn(3, 4, 8))  # not a stream tensor of 2 streams
    with pytest.raises(ValueError):
        HyperConnections(_branch(), streams=2, sinkhorn_tol=-1.0)


def test_survives_deepcopy_and_repeat_reinitialises_coefficients():
    hc = HyperConnections(_branch(), streams=3, depth=4)
    _randomise_coefficients(hc)
    twin = copy.deepcopy(hc)
    for a in twin.atoms():
        a.reset_parameters()
    assert torch.allclose(twin.static.weight, twin.static._init.float())
    assert torch.all(twin.gate.weight == 1)
    assert all(isinstance(p._mm_atom(), atoms.Atom) for p in twin.parameters())
    assert len(list(hc.parameters())) == len(hc.atoms())  # every learnable tensor is inside an atom


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("constrained", [True, False])
def test_gradcheck_block(constrained):
    torch.manual_seed(0)
    hc = HyperConnections(atoms.Linear(4, 4) @ bonds.RMSNorm(), streams=3, constrained=constrained, depth=3).double()
    _randomise_coefficients(hc, gates=30.0)  # large gates: the dynamic path matters numerically
    names = [n for n, _ in hc.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in hc.parameters())
    x = _x((1, 2, 3, 4)).requires_grad_()

    def f(x, *ws):
        return torch.func.functional_call(hc, dict(zip(names, ws)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(constrained=False), dict(dynamic=False), dict(recompute=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_layer_equals_the_kernel_composition(kw, dtype, monkeypatch):
    """In eager mode on CPU a layer runs the reference's fused layer (two autograd nodes); the
    composition of the public kernels (what a GPU and torch.compile run) gives the same output
    exactly and the same gradients to rounding."""
    torch.manual_seed(0)
    hc = _randomise_coefficients(HyperConnections(_branch(), streams=4, depth=4, **kw).to(dtype), gates=20.0)
    twin = copy.deepcopy(hc)
    x, g = torch.randn(2, 5, 4, 8, dtype=dtype), torch.randn(2, 5, 4, 8, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = hc(x1)
    out.backward(g)
    monkeypatch.setattr(kernels, "fused_layer", lambda x: False)
    ref = twin(x2)
    ref.backward(g)
    assert torch.equal(out, ref)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    for p, q in zip(hc.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol)


def test_recompute_gives_identical_gradients():
    torch.manual_seed(0)
    hc = HyperConnections(_branch(), streams=4, depth=4)
    _randomise_coefficients(hc, gates=5.0)
    twin = copy.deepcopy(hc)
    twin.recompute = True
    x = torch.randn(2, 7, 4, 8)
    g_out = torch.randn(2, 7, 4, 8)
    grads = []
    for m in (hc, twin):
        xi = x.clone().requires_grad_()
        (m(xi) * g_out).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- stability
def _stack(constrained, layers=64, streams=4, std=1.5, seed=0):
    """A deep stack whose static H_res comes from random logits (mHC: Sinkhorn(exp(L)), HC: L used
    as the deviation of H_res from I)."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(layers):
        hc = HyperConnections(atoms.Linear(4, 4) @ bonds.RMSNorm(), streams=streams, constrained=constrained,
                              dynamic=True, width=4)
        L = std * torch.randn(streams, streams, generator=g)
        with torch.no_grad():
            n = streams
            hc.static.weight[2 * n:] = (L if constrained else torch.eye(n) + L).flatten()
        mods.append(hc)
    return Compose(*mods)


def test_deep_random_stack_mhc_gain_bounded_hc_explodes():
    mhc = stability_report(_stack(True))
    hc = stability_report(_stack(False))
    assert mhc["source"] == "static parameters"
    assert mhc["final_composite_forward_gain"] < 2 and mhc["final_composite_backward_gain"] < 2
    assert max(mhc["composite_backward_gain"]) < 2
    assert hc["final_composite_forward_gain"] > 1e3 * mhc["final_composite_forward_gain"]
    # rows are normalised last: every per-layer forward gain is 1 to rounding
    assert max(abs(l["forward_gain"] - 1) for l in mhc["layers"]) < 1e-5
    assert mhc["max_marginal_error"] is not None and mhc["max_marginal_error"] < 0.1


def test_stability_report_on_gpt_batch_and_tolerance_mode():
    torch.manual_seed(0)
    gpt = compounds.GPT(vocab_size=11, context=8, width=16, depth=2, heads=2, residual="mhc", streams=4,
                        attn_manifold="euclidean", mlp_manifold="euclidean", sinkhorn_tol=1e-6)
    rep = stability_report(gpt)
    assert rep["source"] == "random tokens" and len(rep["layers"]) == 4
    assert rep["max_marginal_error"] < 1e-5
    assert rep["final_composite_forward_gain"] == pytest.approx(1, abs=1e-5)
    rep2 = stability_report(gpt, batch=torch.randint(0, 11, (3, 5)))
    assert rep2["source"] == "batch" and abs(rep2["final_composite_backward_gain"] - 1) < 1e-3


def test_recording_and_static_residual_are_the_public_accessors():
    torch.manual_seed(0)
    hc = _randomise_coefficients(HyperConnections(_branch(), streams=4, depth=4), logit_std=2.0)
    x = torch.randn(2, 3, 4, 8)
    with hc.recording() as rec:
        out = hc(x)
    assert hc._record is None  # closed again: no recording cost outside the context
    torch.testing.assert_close(rec["h_res"], hc.coefficients(x)[2].detach())
    assert 0 <= rec["marginal_error"] < 0.05  # 20 iterations at logit std 2: not converged, but reported
    H, err = hc.static_residual(return_error=True)
    assert H.dtype == torch.float64 and 0 <= err < 0.05
    torch.testing.assert_close(H.sum(-1), torch.ones(4, dtype=torch.float64))  # rows normalised last
    torch.testing.assert_close(H, hc.project_residual(hc.static.weight.double()[8:].reshape(4, 4)))
    assert torch.equal(hc(x), out)


def test_compounds_export_each_name_once_and_hyper_block_lives_with_the_gpt():
    assert len(compounds.__all__) == len(set(compounds.__all__))
    assert compounds.hyper_block.__module__ == "modula_mhc.compounds.gpt"
    assert compounds.stability_report.__module__ == "modula_mhc.compounds.hyper_diagnostics"


# ----------------------------------------------------------------------------- GPT
@pytest.mark.parametrize("residual", ["mhc", "hc"])
def test_gpt_forward_backward(residual):
    torch.manual_seed(0)
    gpt = compounds.GPT(vocab_size=13, context=8, width=16, depth=2, heads=2, residual=residual, streams=4,
                        attn_manifold="euclidean", mlp_manifold="euclidean")
    idx = torch.randint(0, 13, (2, 8))
    logits = gpt(idx)
    assert logits.shape == (2, 8, 13) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), idx.reshape(-1))
    loss.backward()
    for p in gpt.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    grads = [p.grad for p in gpt.parameters()]
    upd = gpt.dualize(grads, target_norm=0.5)
    assert gpt.norm(upd).item() == pytest.approx(0.5, rel=1e-3)


def test_gpt_mhc_trains_on_tiny_corpus():
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog. " * 20
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    gpt = compounds.GPT(vocab_size=len(vocab), context=16, width=32, depth=2, heads=2, residual="mhc", streams=4,
                        attn_manifold="euclidean", mlp_manifold="euclidean")
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(data) - 17, (8,), generator=g)
        batch = torch.stack([data[s:s + 17] for s in starts])
        logits = gpt(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # measured: ~3.0 → ~1.5 nats (log 28 = 3.3 for a uniform guess)
    assert end < 0.65 * start, (start, end)


# ----------------------------------------------------------------------------- static Birkhoff path
def test_static_mix_on_birkhoff_stays_doubly_stochastic_under_dualize_retract_steps():
    torch.manual_seed(0)
    hc = HyperConnections(_branch(), streams=4, dynamic=False, depth=4)
    assert isinstance(hc.mix, Mix) and hc.mix.manifold.name == "birkhoff"
    assert not hasattr(hc, "phi")
    x = torch.randn(4, 6, 4, 8)
    target = torch.randn(4, 6, 4, 8)
    W0 = hc.mix.weight.detach().clone()
    for _ in range(10):
        hc.zero_grad()
        ((hc(x) - target) ** 2).mean().backward()
        upd = hc.dualize([p.grad for p in hc.parameters()], target_norm=1.0)
        for a, u in zip(hc.atoms(), upd):  # what DualizeRetract does per atom
            a.step_weight(u, lr=0.05)
    W = hc.mix.weight.detach()
    assert (W - W0).abs().max() > 1e-3  # it moved
    assert (W > 0).all()
    assert (W.sum(-1) - 1).abs().max() < 1e-4 and (W.sum(-2) - 1).abs().max() < 1e-4
    _, _, H = hc.coefficients(x)
    assert torch.equal(H[0, 0], W)


def test_static_and_dynamic_agree_when_gates_are_zero():
    """dynamic=False (Mix atom) and dynamic=True with zero gates are the same function when the
    Mix weight equals Sinkhorn(exp(b_res))."""
    torch.manual_seed(0)
    dyn = HyperConnections(_branch(), streams=4, depth=4).double()
    _randomise_coefficients(dyn, logit_std=1.0, gates=0.0)
    sta = HyperConnections(copy.deepcopy(dyn.branch), streams=4, dynamic=False, depth=4).double()
    with torch.no_grad():
        sta.static.weight.copy_(dyn.static.weight[:8])
        sta.mix.weight.copy_(dyn.project_residual(dyn.static.weight[8:].reshape(4, 4)))
    x = _x((2, 5, 4, 8))
    torch.testing.assert_close(sta(x), dyn(x))


# ----------------------------------------------------------------------------- claims
CLAIM_CASES = {
    "mhc-init": dict(constrained=True, dynamic=True, randomise=False),
    "mhc-random": dict(constrained=True, dynamic=True, randomise=True),
    "mhc-static": dict(constrained=True, dynamic=False, randomise=True),
    "hc-init": dict(constrained=False, dynamic=True, randomise=False),
    "mhc-nodepth": dict(constrained=True, dynamic=True, randomise=True, depth=None),
    "mhc-tol": dict(constrained=True, dynamic=True, randomise=True, sinkhorn_tol=1e-9),
}


def _claim_net(name):
    torch.manual_seed(0)
    case = dict(CLAIM_CASES[name])
    randomise = case.pop("randomise")
    case.setdefault("depth", 4)
    hc = HyperConnections(_branch(), streams=4, **case).double()
    if randomise:
        _randomise_coefficients(hc, logit_std=1.0, gates=1.0)  # gates at the edge of the unit ball
    return hc


def _fd_jvp(f, x, dx, eps=1e-5):
    """Directional derivative by central differences in float64 (the Sinkhorn autograd.Function has
    an exact backward but no forward-mode rule, so torch.func.jvp cannot run through it)."""
    with torch.no_grad():
        return (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps)


def _power_direction(f, x, iters=6, seed=0):
    """Top right-singular direction of the input Jacobian: J v by differences, Jᵀ u by autograd."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    for _ in range(iters):
        u = _fd_jvp(f, x, v / v.norm())
        xi = x.clone().requires_grad_()
        (v,) = torch.autograd.grad(f(xi), xi, u)
    return v / v.norm()


def _well_normed_streams(shape, seed):
    """Unit-RMS streams that are copies of one another, as ExpandStreams makes them: the branch
    input u = Σ_j h_pre_j x_j is then a multiple of a unit-RMS vector (the derivation's assumption)."""
    *lead, n, C = shape
    return ExpandStreams(n)(_x((*lead, C), seed=seed)).contiguous()


@pytest.mark.parametrize("name", sorted(CLAIM_CASES))
def test_sensitivity_measured_below_claimed(name):
    hc = _claim_net(name)
    x = _well_normed_streams((2, 5, 4, 8), seed=1)
    nu = float(hc.sensitivity)
    worst = 0.0
    dirs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + s), dtype=x.dtype) for s in range(4)]
    dirs.append(_power_direction(hc, x))
    for dx in dirs:
        dx = scale_to(dx, 1.0)
        worst = max(worst, seq_norm(_fd_jvp(hc, x, dx)).item())
    assert worst <= nu * SLACK, f"{name}: measured {worst:.4f} > claimed {nu:.4f}"
    assert worst > 0.05 * nu, f"{name}: measured {worst:.4f} suspiciously far below {nu:.4f}"


@pytest.mark.parametrize("name", sorted(CLAIM_CASES))
def test_well_normed_in_weights(name):
    """‖∇_w f · Δw‖ ≤ ‖Δw‖_M for random and dualized Δw (directional derivative by differences)."""
    hc = _claim_net(name)
    x = _well_normed_streams((2, 5, 4, 8), seed=2)
    names = [n for n, _ in hc.named_parameters()]
    w0 = [p.detach().clone() for p in hc.parameters()]
    f = lambda t, dw: torch.func.functional_call(hc, {n: w + t * d for n, w, d in zip(names, w0, dw)}, (x,))
    dirs = [random_like_params(hc, seed=s) for s in range(3)]
    dirs.append(hc.dualize(random_like_params(hc, seed=9)))
    eps = 1e-5
    for dw in dirs:
        with torch.no_grad():
            d = (f(eps, dw) - f(-eps, dw)) / (2 * eps)
        assert seq_norm(d).item() <= hc.norm(dw).item() * SLACK


def test_atoms_of_mixing():
    gate = Gate((2, 3), scale=0.5)
    z = torch.ones(5)
    torch.testing.assert_close(gate(z), torch.full((5,), 0.5))
    sc = StaticCoefficients(2, [1.0, 2.0, 3.0, -4.0] + [0.5, -0.5, 0.25, 0.0], norm="mixing")
    # max(‖pre‖₁ = 3, ‖post‖∞ = 4, max row sum = 1)
    assert sc.weight_norm().item() == pytest.approx(4.0)
    G = torch.randn(8)
    A = sc.dualize_weight(G, target=2.0)
    assert sc.weight_norm(A).item() == pytest.approx(2.0)
    # dual optimality against random unit-norm candidates
    best = (G * A).sum()
    for s in range(50):
        B = torch.randn(8, generator=torch.Generator().manual_seed(s))
        B = 2.0 * B / sc.weight_norm(B)
        assert (G * B).sum() <= best + 1e-5
    mix = Mix(3)
    torch.testing.assert_close(mix.weight.sum(-1), torch.ones(3))
    assert mix.weight.diagonal().min().item() == pytest.approx(0.95)


def test_static_mix_with_the_dualize_retract_optimizer():
    optim = pytest.importorskip("modula_mhc.optim")
    if not hasattr(optim, "DualizeRetract"):
        pytest.skip("modula_mhc.optim.DualizeRetract not available")
    torch.manual_seed(0)
    hc = HyperConnections(_branch(), streams=4, dynamic=False, depth=4)
    opt = optim.DualizeRetract(hc, lr=0.05)
    x, target = torch.randn(4, 6, 4, 8), torch.randn(4, 6, 4, 8)
    W0 = hc.mix.weight.detach().clone()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ((hc(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    W = hc.mix.weight.detach()
    assert (W - W0).abs().max() > 1e-3 and (W > 0).all()
    assert (W.sum(-1) - 1).abs().max() < 1e-4 and (W.sum(-2) - 1).abs().max() < 1e-4
    assert losses[-1] < losses[0]


def test_norm_at_init_gives_mhc_the_plain_residual_step_sizes():
    """norm_at="init" (default): the modular norm weighs an HC/mHC layer by its constants at init
    (those of the plain residual), so the embedding and head get the plain GPT's coefficients;
    norm_at="bound" uses the certified worst-case sensitivity, which compounds over depth."""
    kw = dict(vocab_size=65, context=16, width=32, depth=3, heads=2, attn_manifold="euclidean",
              mlp_manifold="euclidean")
    plain = compounds.GPT(**kw)
    for residual in ("hc", "mhc"):
        net = compounds.GPT(**kw, residual=residual)
        assert net.norm_sensitivity == pytest.approx(plain.norm_sensitivity)
        assert net.sensitivity > net.norm_sensitivity  # the claim stays the certified bound
        for end in (0, -1):  # embed, head
            assert net.norm_coefficients()[end] == pytest.approx(plain.norm_coefficients()[end])
        bound = compounds.GPT(**kw, residual=residual, norm_at="bound")
        assert bound.norm_sensitivity == pytest.approx(bound.sensitivity)
        assert bound.norm_coefficients()[0] > 2 * net.norm_coefficients()[0]
        upd = net.dualize([torch.randn_like(p) for p in net.parameters()], target_norm=0.5)
        assert net.norm(upd).item() == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(ValueError, match="norm_at"):
        compounds.HyperConnections(atoms.Linear(8, 8), streams=2, norm_at="typical")


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_autocast_bf16_forward_and_backward(residual):
    """Under CPU autocast (the CLI's --dtype bfloat16) the branch outputs are bf16 while the streams
    stay float32: the post-mix backward multiplied the two and raised a dtype error. Gradients now
    flow and stay near the float32 ones."""
    from modula_mhc import compounds
    torch.manual_seed(0)
    gpt = compounds.GPT(vocab_size=20, context=8, width=16, depth=2, heads=2, residual=residual, streams=2)
    x = torch.randint(0, 20, (2, 8))
    gpt(x).float().square().mean().backward()
    exact = [p.grad.clone() for p in gpt.parameters()]
    gpt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gpt(x)
    out.float().square().mean().backward()
    got = torch.cat([p.grad.flatten() for p in gpt.parameters()])
    want = torch.cat([g.flatten() for g in exact])
    assert torch.isfinite(got).all()
    assert float((got - want).norm()) <= 0.05 * float(want.norm())
