"""Adversarial claims (issue 12): the library's constants against gradient-ascent measurements.

Every case asserts the invariant of :mod:`modula_mhc.claims`: at the input the adversary found, the
measured ratio ≤ the constant ``certify`` gives there; and where ``certify`` says the batch is
inside the declared domain, measured ≤ the declared constant. The counterexamples of issue 12 are
regression tests at the end. Tiny widths and few restarts keep the fast part ≲ 40 s; the
trained variants of every model and the α/β measurements are marked slow.
"""
import math

import pytest
import torch

from modula_mhc import claims, compounds
from modula_mhc.compounds.gpt import mlp_branch
from modula_mhc.compounds.hyper import HyperConnections
from modula_mhc.optim import DualizeRetract

SLACK = 1 + 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return claims.unit_rms(torch.randn(shape, generator=g, dtype=torch.float64))


def _gpt(residual, heads=2, **kw):
    return compounds.GPT(16, 8, 16, 2, heads, residual=residual, attn_manifold="euclidean",
                         mlp_manifold="euclidean", **kw)


MODELS = {
    "mlp": (lambda: compounds.MLP(24, 12, 32, 3), lambda: _x((4, 24))),
    "resmlp": (lambda: compounds.ResMLP(24, 12, 32, 3), lambda: _x((4, 24))),
    "resmlp-in>width": (lambda: compounds.ResMLP(64, 8, 32, 4), lambda: _x((4, 64))),
    "attention-H1": (lambda: compounds.Attention(16, 1), lambda: _x((2, 6, 16))),
    "attention-H4": (lambda: compounds.Attention(32, 4), lambda: _x((2, 6, 32))),
    "attention-H8": (lambda: compounds.Attention(32, 8), lambda: _x((2, 6, 32))),
    "block": (lambda: compounds.Block(16, 2, depth=2), lambda: _x((2, 6, 16))),
    "gpt-plain": (lambda: _gpt("plain"), lambda: torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))),
    "gpt-hc": (lambda: _gpt("hc"), lambda: torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))),
    "gpt-mhc": (lambda: _gpt("mhc"), lambda: torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))),
    "gpt-mhc-static": (lambda: _gpt("mhc", dynamic=False),
                       lambda: torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))),
    # the GPT's default manifolds (Stiefel attention, DGram MLP): the weight gain 2.0 / 3.43
    "gpt-hetero": (lambda: compounds.GPT(16, 8, 16, 2, 2),
                   lambda: torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))),
    "gpt-hc-hetero": (lambda: compounds.GPT(16, 8, 16, 2, 2, residual="hc"),
                      lambda: torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))),
}
FAST_TRAINED = {"mlp", "resmlp-in>width", "gpt-plain"}
SLOW_ONLY = {"gpt-hetero", "gpt-hc-hetero"}  # the Stiefel dual ascent in every dualize is slow on CPU


def _train(net, x, steps=50, lr=0.05):
    """≥ 50 DualizeRetract steps on a fixed random target (cross-entropy for token models)."""
    opt = DualizeRetract(net, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        y0 = net(x)
    target = torch.randint(0, y0.shape[-1], y0.shape[:-1], generator=g) if not x.is_floating_point() \
        else torch.randn(y0.shape, generator=g, dtype=y0.dtype)
    for _ in range(steps):
        opt.zero_grad()
        y = net(x)
        loss = torch.nn.functional.cross_entropy(y.flatten(0, -2), target.flatten()) if not x.is_floating_point() \
            else (y - target).pow(2).mean()
        loss.backward()
        opt.step()
    return net


def _build(name, trained):
    torch.manual_seed(0)
    make, make_x = MODELS[name]
    net, x = make().double(), make_x()
    if trained:
        _train(net, x)
    return net, x


def _assert_sensitivity(net, x, restarts=2, steps=20):
    f, xf = claims.input_part(net, x)
    m = claims.measure_sensitivity(f, xf, restarts=restarts, steps=steps)
    cert = claims.certify(f, m.x)
    assert m.value <= cert.certified["sensitivity"] * SLACK, (m.value, cert.certified, cert.violations)
    if cert.in_domain:
        assert m.value <= cert.claimed["sensitivity"] * SLACK
        assert cert.certified["sensitivity"] <= cert.claimed["sensitivity"] * SLACK
    return m, cert


def _assert_weight_gain(net, x, restarts=2, steps=8):
    w = claims.measure_weight_gain(net, x, restarts=restarts, steps=steps)
    cert = claims.certify(net, x)
    assert w.value <= cert.certified["weight_gain"] * SLACK, (w.value, cert.certified, cert.violations)
    if cert.in_domain:
        assert w.value <= cert.claimed["weight_gain"] * SLACK
    return w, cert


def _cases():
    for name in MODELS:
        yield pytest.param(name, False, id=f"{name}-init", marks=(pytest.mark.slow,) if name in SLOW_ONLY else ())
        marks = () if name in FAST_TRAINED else (pytest.mark.slow,)
        yield pytest.param(name, True, id=f"{name}-trained", marks=marks)


@pytest.mark.parametrize("name,trained", list(_cases()))
def test_sensitivity_and_weight_gain_hold_where_certified(name, trained):
    net, x = _build(name, trained)
    light = name.startswith("gpt-") or trained  # keep the fast part of the file short
    _assert_sensitivity(net, x, restarts=1 if light else 2, steps=12 if light else 20)
    _assert_weight_gain(net, x, restarts=1 if light else 2, steps=4 if light else 8)


@pytest.mark.parametrize("name", ["mlp", "resmlp-in>width", "attention-H4", "block"])
def test_gamma_holds_where_certified(name):
    net, x = _build(name, False)
    f, xf = claims.input_part(net, x)
    gamma_claim = claims.certify(f, xf).claimed["gamma"]
    if not math.isfinite(gamma_claim):
        pytest.skip("γ = ∞ declared")
    m = claims.measure_sharpness(f, xf, "gamma", restarts=1, steps=8)
    assert m.value <= claims.certify(f, m.x).certified["gamma"] * (1 + 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "resmlp", "resmlp-in>width", "attention-H4", "block", "gpt-plain"])
@pytest.mark.parametrize("which", ["alpha", "beta"])
def test_alpha_beta_hold_where_certified(name, which):
    net, x = _build(name, False)
    if which == "beta" and not x.is_floating_point():
        pytest.skip("β needs a continuous input")
    cert = claims.certify(net, x)
    if not math.isfinite(cert.certified[which]):
        pytest.skip(f"{which} = ∞ certified")
    m = claims.measure_sharpness(net, x, which, restarts=1, steps=6)
    assert m.value <= cert.certified[which] * (1 + 1e-4)


def test_in_domain_means_certified_equals_claimed():
    """A plain MLP at init on unit inputs: every condition holds and the local constants are the
    declared ones (nothing silently replaced)."""
    net, x = _build("mlp", False)
    cert = claims.certify(net, x)
    assert cert.in_domain, cert.violations
    for k in ("sensitivity", "weight_gain", "alpha", "beta", "gamma"):
        # rel 1e-6: the atoms sit on their manifolds to rounding (‖W‖ = 1 + 2e-8)
        assert cert.certified[k] == pytest.approx(cert.claimed[k], rel=1e-6) or \
            (math.isinf(cert.certified[k]) and math.isinf(cert.claimed[k]))


def test_check_claims_report():
    net, x = _build("resmlp", False)
    rep = claims.check_claims(net, x, restarts=1, steps=8)
    assert set(rep) >= {"in_domain", "violations", "claimed", "certified", "measured", "ok"}
    assert rep["ok"]
    assert net.__dict__.get("_local_stats") is None  # certify leaves no state behind
    assert all("_local_stats" not in m.__dict__ for m in net.modules())


# --------------------------------------------------------------------------- issue 12 counterexamples
def test_gpt_final_rmsnorm_out_of_domain_is_reported():
    """GPT(16, width 32, depth 2, heads 4): the residual stream enters the final RMSNorm at RMS ≈ 0.3
    (the old claim 1.065 was measured at 3.93). The check names the norm; the certified constant covers
    what the adversary finds."""
    torch.manual_seed(0)
    gpt = compounds.GPT(16, 8, 32, 2, 4, attn_manifold="euclidean", mlp_manifold="euclidean").double()
    idx = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    cert = claims.certify(gpt, idx)
    assert not cert.in_domain
    assert any(v.startswith("layers.3: RMSNorm input RMS") for v in cert.violations), cert.violations
    assert cert.certified["sensitivity"] > cert.claimed["sensitivity"]
    _assert_sensitivity(gpt, idx, restarts=1, steps=15)


def test_resmlp_null_space_input_is_reported_and_certified():
    """ResMLP(in 64, width 32): a unit-RMS input almost in the null space of the first Linear, a
    direction in its row space (the issue's deterministic 5.42 against the old 1.135)."""
    torch.manual_seed(0)
    net = compounds.ResMLP(64, 8, 32, 4).double()
    W = net.layers[0].weight.detach()                      # (32, 64), orthonormal rows
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 64, generator=g, dtype=torch.float64)
    null = z - (z @ W.T) @ W
    x = claims.unit_rms(null + 0.02 * (z @ W.T) @ W)
    dx = claims.unit_rms((torch.randn(2, 64, generator=g, dtype=torch.float64) @ W.T) @ W)
    jv = torch.func.jvp(net, (x,), (dx,))[1]
    measured = float(claims.seq_norm(jv.detach()))
    cert = claims.certify(net, x)
    assert measured > 2 * cert.claimed["sensitivity"]       # the declared constant does not apply here…
    assert not cert.in_domain and any("RMSNorm input RMS" in v for v in cert.violations)  # …and the check says so
    assert measured <= cert.certified["sensitivity"] * SLACK


@pytest.mark.parametrize("heads,width", [(1, 16), (4, 32), (8, 32)])
def test_attention_heads_claim(heads, width):
    """The old claim 1 was measured at 2.17 (H = 4) and 3.14 (H = 8); the claim is now max(√H, H)."""
    torch.manual_seed(0)
    net = compounds.Attention(width, heads).double()
    assert float(net.sensitivity) == pytest.approx(heads)
    m, cert = _assert_sensitivity(net, _x((2, 6, width)), restarts=2, steps=30)
    assert cert.in_domain
    if heads > 1:
        assert m.value > 1.5  # beyond the old claim: the estimator finds the multi-head effect


@pytest.mark.parametrize("constrained,dynamic", [(True, True), (True, False), (False, True)])
def test_hyper_alternating_streams_reported_and_certified(constrained, dynamic):
    """Streams (v, −v, v, −v): the branch input is ≈ 0 and its RMSNorm amplifies (mHC measured 39.4
    against the old 3.065, HC 11.8 against 1.19). Out of domain, and the local constant covers it."""
    torch.manual_seed(0)
    layer = HyperConnections(mlp_branch(16), streams=4, depth=4, constrained=constrained, dynamic=dynamic).double()
    with torch.no_grad():  # equal h_pre, as in the issue (the static init may spread them)
        layer.static.weight[:4] = layer.static.weight[:4].mean()
    v = _x((2, 3, 16))
    x = torch.stack([v, -v, v, -v], dim=-2)
    m = claims.measure_sensitivity(layer, x, restarts=1, steps=3, move_input=False)
    cert = claims.certify(layer, x)
    assert m.value > cert.claimed["sensitivity"]
    assert not cert.in_domain
    assert m.value <= cert.certified["sensitivity"] * SLACK


def test_hyper_parallel_streams_local_constant_is_tight():
    """Copied unit streams (the declared domain of the static layer): local ≤ declared, measured ≤ local."""
    torch.manual_seed(0)
    layer = HyperConnections(mlp_branch(16), streams=4, depth=4, dynamic=False).double()
    x = _x((2, 3, 16)).unsqueeze(-2).expand(2, 3, 4, 16).contiguous()
    cert = claims.certify(layer, x)
    assert cert.in_domain, cert.violations
    m = claims.measure_sensitivity(layer, x, restarts=1, steps=10, move_input=False)
    assert m.value <= cert.certified["sensitivity"] * SLACK <= cert.claimed["sensitivity"] * SLACK ** 2
    assert cert.certified["sensitivity"] < 0.5 * cert.claimed["sensitivity"]


def test_norm_at_init_weight_gain_is_claimed():
    """norm_at="init" builds the norm with h_post = 1; once h_post moves toward 2 the weight effect
    of one mHC layer exceeded 1 (1.32–1.38). The claim is now weight_gain κ > 1 and it holds."""
    torch.manual_seed(0)
    layer = HyperConnections(mlp_branch(16), streams=4, depth=4).double()
    with torch.no_grad():
        layer.static.weight[4:8] = 3.0  # h_post = 2σ(3) ≈ 1.9
    x = _x((2, 3, 16)).unsqueeze(-2).expand(2, 3, 4, 16).contiguous()
    w, cert = _assert_weight_gain(layer, x, restarts=2, steps=10)
    assert cert.claimed["weight_gain"] > 1.5
    assert w.value > 1.0  # the old claim (κ = 1) is false here


def test_training_leaves_domain_and_check_says_so():
    """Muon-trained (Euclidean manifold) Linear atoms grow past natural norm 1; certify lists them and
    its local constants still bound the measurements."""
    net, x = _build("mlp", False)
    assert claims.certify(net, x).in_domain
    _train(net, x, steps=60, lr=0.2)
    cert = claims.certify(net, x)
    assert any("natural norm" in v for v in cert.violations), cert.violations
    assert cert.certified["sensitivity"] > cert.claimed["sensitivity"]
    _assert_sensitivity(net, x)
    _assert_weight_gain(net, x)


def test_static_mhc_mix_atoms_are_in_domain_at_init():
    """The Mix atom's natural norm is ≥ √n by construction; its domain is row-stochastic and ≥ 0."""
    torch.manual_seed(0)
    gpt = _gpt("mhc", dynamic=False).double()
    cert = claims.certify(gpt, torch.randint(0, 16, (1, 4)))
    assert not any("Mix" in v for v in cert.violations)


# --------------------------------------------------------------------------- audit: Conv2d, Mix, Gate; bad input
def _cnn_case():
    """Linear @ Flatten @ (0.2·Conv2d) on images of per-pixel RMS 5 (the audit measured κ 1.36–1.40
    against a certified 1 while certify said in_domain)."""
    from modula_mhc import atoms, bonds
    net = atoms.Linear(8 * 6 * 6, 10) @ bonds.Flatten() @ (0.2 * atoms.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return net, 5 * x / x.pow(2).mean(1, keepdim=True).sqrt()


def _atom_case(name):
    from modula_mhc import atoms
    if name == "conv2d":
        return _cnn_case()
    if name == "mix":  # streams of RMS 5: measured κ 4.04 against a certified 1
        return atoms.Mix(3), 5 * _x((2, 3, 8))
    return atoms.Gate([4, 4], scale=0.5), 5 * _x((3, 8))  # measured κ 2.5 against a certified 1


@pytest.mark.parametrize("name", ["conv2d", "mix", "gate"])
def test_large_inputs_of_conv_mix_gate_are_reported_and_certified(name):
    """Their weight effect ‖ΔW x‖ ≤ ‖ΔW‖‖x‖ assumes inputs of size ≤ 1 (Conv2d: per-pixel RMS over
    channels); larger ones are named and the certified κ covers the measured one."""
    torch.manual_seed(0)
    net, x = _atom_case(name)
    net = net.double()
    w = claims.measure_weight_gain(net, x, restarts=2, steps=10)
    cert = claims.certify(net, x)
    assert w.value > cert.claimed["weight_gain"] * 1.3          # the declared κ does not apply here…
    assert not cert.in_domain and any("input RMS 5 > 1" in v for v in cert.violations), cert.violations
    assert w.value <= cert.certified["weight_gain"] * SLACK     # …and the certified one holds
    inside = claims.certify(net, x / 5)                          # the same atoms at unit-size inputs
    assert inside.in_domain, inside.violations
    assert inside.certified["weight_gain"] == pytest.approx(inside.claimed["weight_gain"])


def _off_domain(name):
    from modula_mhc import atoms
    if name == "mix":  # unit row sums, one entry −1: ‖W‖_{∞→∞} = 3 (the audit: certified 1, measured 3)
        m = atoms.Mix(3).double()
        w, x = [[1.0, 1.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], _x((2, 3, 8))
    else:  # scale·‖g‖_∞ = 5 (the audit: certified 0.5, measured 5)
        m = atoms.Gate([4, 4], scale=0.5).double()
        w, x = [10.0, -3.0], _x((3, 8))
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w))
    return (atoms.Linear(8, 8).double() @ m if name == "linear@gate" else m), x


@pytest.mark.parametrize("name", ["gate", "mix", "linear@gate"])
def test_off_domain_gate_and_mix_weights_are_certified_with_their_norms(name):
    net, x = _off_domain(name)
    m = claims.measure_sensitivity(net, x, restarts=2, steps=10, move_input=False)
    cert = claims.certify(net, x)
    assert not cert.in_domain
    assert m.value > 2 * cert.claimed["sensitivity"]
    assert m.value <= cert.certified["sensitivity"] * SLACK, (m.value, cert.certified)


def test_gate_scale_above_one_weight_gain_is_declared():
    """y = scale·g ⊙ z moves by scale·‖Δg‖_∞ at unit inputs: κ = scale (2 measured against the old 1)."""
    from modula_mhc import atoms
    gate, x = atoms.Gate([4, 4], scale=2.0).double(), _x((3, 8))
    w, cert = _assert_weight_gain(gate, x, restarts=1, steps=5)
    assert cert.in_domain and w.value > 1.9


def _nan_x():
    x = _x((3, 8))
    x[0, 0] = math.nan
    return x


def _nan_weight_net():
    net = compounds.ResMLP(8, 4, 8, 2).double()
    with torch.no_grad():
        net.atoms()[0].weight[0, 0] = math.nan
    return net


BAD_CALLS = {
    "certify-nan-x": (lambda net: claims.certify(net, _nan_x()), "x has non-finite"),
    "check_claims-nan-x": (lambda net: claims.check_claims(net, _nan_x(), restarts=1, steps=2), "x has non-finite"),
    "sensitivity-nan-x": (lambda net: claims.measure_sensitivity(net, _nan_x()), "x has non-finite"),
    "sensitivity-inf-x": (lambda net: claims.measure_sensitivity(net, _x((3, 8)) * math.inf), "x has non-finite"),
    "weight_gain-nan-x": (lambda net: claims.measure_weight_gain(net, _nan_x()), "x has non-finite"),
    "sharpness-nan-x": (lambda net: claims.measure_sharpness(net, _nan_x(), "beta"), "x has non-finite"),
    "restarts=0": (lambda net: claims.measure_sensitivity(net, _x((3, 8)), restarts=0), "restarts must be"),
    "steps=0": (lambda net: claims.measure_sensitivity(net, _x((3, 8)), steps=0), "steps must be"),
    "weight_gain-restarts=-1": (lambda net: claims.measure_weight_gain(net, _x((3, 8)), restarts=-1),
                                "restarts must be"),
    "check_claims-steps=0": (lambda net: claims.check_claims(net, _x((3, 8)), steps=0), "steps must be"),
    "certify-nan-weight": (lambda net: claims.certify(_nan_weight_net(), _x((3, 8))), "weight 'layers.0.weight'"),
    "weight_gain-nan-weight": (lambda net: claims.measure_weight_gain(_nan_weight_net(), _x((3, 8))),
                               "weight 'layers.0.weight'"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_an_error_not_a_silent_answer(case):
    """NaN/inf inputs used to certify as in-domain and measure 0 (check_claims ok=True); zero restarts
    or steps measured 0; a NaN weight failed inside an SVD. Each is now a ValueError naming it."""
    torch.manual_seed(0)
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call(compounds.ResMLP(8, 4, 8, 2).double())
