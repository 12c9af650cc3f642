"""adapt on models written outside this library: its stated promises hold, or it says why not.

Every test builds a small foreign model from plain torch layers (nothing here was shaped for
adapt) and checks one promise adversarially: no false Lipschitz / weight-gain claim, frozen and
parametrized weights left as the model defines them, clear errors at the boundary.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import modula_mhc as mm
from modula_mhc import claims


class _ViT(nn.Module):
    """Patches → two pre-norm nn.TransformerEncoderLayer blocks → mean → head."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.patch = nn.Linear(12, d)
        self.encoder = nn.ModuleList([nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                                                 norm_first=True) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.patch(x)
        for layer in self.encoder:
            x = layer(x)
        return self.head(self.norm(x)).mean(1, keepdim=True)


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.o_proj(a @ self.v_proj(x))


class _Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.input_layernorm, self.self_attn = nn.LayerNorm(d), _Attention(d)
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _LM(nn.Module):
    def __init__(self, vocab=11, d=16, depth=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Layer(d) for _ in range(depth)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class _ResMLP(nn.Module):
    """x + MLP(LayerNorm(x)) twice, between a Linear stem and a Linear head."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(),
                                                   nn.Linear(4 * d, d)) for _ in range(2)])
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


def test_adapted_sensitivity_is_no_claim_an_adversary_breaks():
    """The recovered structure's sensitivity is an estimate: certify must not claim it. On this ViT
    the estimate 4 was claimed and input ascent measured 5.80 (8 steps)."""
    torch.manual_seed(0)
    net = mm.adapt(_ViT(), "hetero").double()
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    measured = claims.measure_sensitivity(net, x, restarts=1, steps=8).value
    cert = claims.certify(net, x)
    assert measured <= cert.claimed["sensitivity"] and measured <= cert.certified["sensitivity"], (measured, cert.claimed)
    assert net.recovered and measured > net.sensitivity_estimate == 4.0  # the estimate stays readable
    assert "sensitivity 4 (estimate" in net.describe(file=False).splitlines()[1]


def test_adapted_weight_gain_is_no_claim_an_adversary_breaks():
    """‖J_w f·Δw‖ ≤ κ‖Δw‖_M: κ = 1 was inherited and claimed; a weight ascent measured 1.49 here."""
    torch.manual_seed(0)
    net = mm.adapt(_ResMLP(), "muon").double()
    x = torch.randn(6, 8, dtype=torch.float64)
    measured = claims.measure_weight_gain(net, x, restarts=1, steps=3).value
    cert = claims.certify(net, x)
    assert measured <= cert.claimed["weight_gain"] and measured <= cert.certified["weight_gain"], (measured, cert.claimed)
    assert measured > 1.0 and math.isinf(net.sensitivity)


def test_hyper_branch_claims_no_weight_gain():
    """A foreign branch's weight gain is not derived (its norm layers and cores are not certified)."""
    hb = mm.adapt.HyperBranch([nn.LayerNorm(8), nn.Linear(8, 8)])
    assert math.isinf(hb.weight_gain)


def test_frozen_parameters_are_left_as_they_are():
    """requires_grad=False: not projected onto a manifold at adapt time (a frozen Llama-style
    q_proj moved by 0.34, max abs, under "hetero"), mass 0 (norm coefficient ∞: target 0, outside the modular norm)."""
    torch.manual_seed(0)
    model = _LM(depth=1)
    for p in [*model.layers[0].input_layernorm.parameters(), model.layers[0].self_attn.q_proj.weight]:
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = mm.adapt(model, "hetero")
    frozen = [a for a in net.atoms() if not a.weight.requires_grad]
    assert frozen and all(torch.equal(a.weight, before[net.name_of(a)]) for a in frozen)
    assert all(a.manifold.name == "euclidean" and float(a.mass) == 0 for a in frozen)
    coef = dict(zip(net.atoms(), net.norm_coefficients()))
    assert all(math.isinf(float(coef[a])) for a in frozen)
    live = [a for a in net.atoms() if a.weight.requires_grad and a.weight.ndim == 2 and a.role.startswith("attn")]
    assert live and all(a.manifold.name == "stiefel" for a in live)
    grads = [torch.randn_like(a.weight) for a in net.atoms()]
    assert float(net.norm(net.dualize(grads, 0.5))) == pytest.approx(0.5, rel=1e-4)
    assert all(mm.optim.DualizeRetract(net)._targets[id(a.weight)] == 0.0 for a in frozen)


@pytest.mark.parametrize("style", ["parametrize", "hook"])
def test_weight_norm_latents_are_not_matrices(style):
    """weight_norm splits a weight into latents g (out, 1) and v: neither is the layer's matrix, so
    neither is moved onto a manifold (all-stiefel changed such a model's output by 0.57, max abs, at adapt)
    and each is read as a plain parameter (RMS norm)."""
    torch.manual_seed(0)
    wn = torch.nn.utils.parametrizations.weight_norm if style == "parametrize" else torch.nn.utils.weight_norm
    with pytest.warns(FutureWarning) if style == "hook" else _nothing():
        model = nn.Sequential(wn(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 8)
    y0 = model(x).detach()
    net = mm.adapt(model, "all-stiefel")
    assert torch.equal(model(x).detach(), y0)
    latents = [a for a in net.atoms() if net.name_of(a).startswith("0.")]
    assert len(latents) == 3 and all(a.role in ("vector", "bias") for a in latents)
    assert all(a.manifold.name == "euclidean" for a in latents)
    with pytest.raises(ValueError, match="only matrices"):
        mm.adapt(model, {"0.*": "stiefel"})


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_boundary_errors_are_clear():
    """Uninitialised (lazy), complex and empty parameters: a clear error at adapt, never a crash
    inside the optimizer (complex failed in its first step) or a ZeroDivisionError."""
    with pytest.raises(ValueError, match="uninitiali[sz]ed.*forward"):
        mm.adapt(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2)))

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))

    with pytest.raises(TypeError, match="complex"):
        mm.adapt(Complex())
    with pytest.raises(ValueError, match="no elements"):
        mm.adapt(nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 2)), "all-stiefel")


def test_a_block_listed_twice_is_one_block_used_twice():
    """nn.ModuleList([blk, blk, blk]) (weights shared across depth): the block is read at each of
    its three places (the last name used to claim its parameters and the first two read as empty,
    leaving every block parameter outside the recovered structure)."""
    torch.manual_seed(0)
    model = _LM(depth=1)
    model.layers = nn.ModuleList([model.layers[0]] * 3)
    net = mm.adapt(model, "muon")
    text = net.describe(file=False)
    assert "3 transformer blocks" in text.splitlines()[0]
    assert all(a.structure == "recovered" for a in net.atoms())
    grads = [torch.randn_like(a.weight) for a in net.atoms()]
    assert float(net.norm(net.dualize(grads, 0.5))) == pytest.approx(0.5, rel=1e-4)


def test_an_optimizer_built_on_an_inline_adapt_keeps_its_views():
    """DualizeRetract(mm.adapt(model)) with the adapted wrapper not kept by the caller: the optimizer
    keeps the module it was given, so the views (referenced weakly from the parameters) live on and
    the step runs (it raised "the atom owning a parameter no longer exists")."""
    import gc

    from modula_mhc.optim import DualizeRetract
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = DualizeRetract(mm.adapt(model, "hetero"), lr=0.1)
    gc.collect()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
