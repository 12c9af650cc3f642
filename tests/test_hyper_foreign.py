"""HC / mHC around models this library did not write: a Llama-style GQA block, Hugging Face style
tuple outputs with keyword-only masks, a conv block, and plain nn.Module networks in the
diagnostics. Each test is a claim of docs/mhc.md or docs/adapt.md checked on such a model."""
import io
import math

import pytest
import torch
from torch import nn

import modula_mhc as mm
from modula_mhc.adapt import HyperBranch, expand_streams, hyper_connections, reduce_streams
from modula_mhc.claims import unit_rms
from modula_mhc.compounds import stability_report
from modula_mhc.compounds.hyper import HyperConnections


class _RMSNorm(nn.Module):
    """A foreign RMSNorm (as Llama's): not the library's bond."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _GQA(nn.Module):
    """Grouped-query causal attention returning (hidden, weights) as Hugging Face layers do;
    the mask is keyword-only."""

    def __init__(self, d, heads=4, kv=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.q, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k, self.v = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)

    def forward(self, x, *, attention_mask=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k, v = (p(x).view(B, T, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
                for p in (self.k, self.v))
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1) if attention_mask is None else attention_mask
        a = s.masked_fill(mask, float("-inf")).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1)), a


class _ConvBlock(nn.Module):
    """A ResNet-style pre-activation conv block on (B, C, H, W): channels first."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


def _zero_gates(hc):
    if hc.dynamic:
        with torch.no_grad():
            hc.gate.weight.zero_()
    return hc


# ----------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("constrained", [True, False])
def test_llama_gqa_block_with_tuple_output_and_mask_starts_as_the_plain_residual(streams, constrained):
    """docs/mhc.md: copied streams and zero gates give every stream x + F(x) (no depth)."""
    torch.manual_seed(0)
    norm, attn = _RMSNorm(16), _GQA(16)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    call = lambda u: attn(norm(u), attention_mask=mask)  # noqa: E731 - a tuple: reduced to its first element
    hc = _zero_gates(hyper_connections([norm, attn], streams=streams, call=call, constrained=constrained))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(reduce_streams(hc(expand_streams(x, streams))), x + call(x)[0])


# ----------------------------------------------------------------------------- blocks HC cannot wrap
@pytest.mark.parametrize("out", [lambda u: u[..., :1], lambda u: u.sum()], ids=["width-1", "scalar"])
def test_branch_output_of_another_width_raises_instead_of_broadcasting(out):
    """A branch C → 1 (or to a scalar) broadcast silently over the C features before."""
    hc = hyper_connections(nn.Linear(16, 16), streams=4, call=out)
    with pytest.raises(ValueError, match="width"):
        hc(torch.randn(2, 5, 4, 16))


@pytest.mark.parametrize("out", [lambda u: {"hidden": u}, lambda u: (), lambda u: (None, u)],
                         ids=["dict", "empty-tuple", "none-first"])
def test_branch_output_that_is_not_a_tensor_raises_a_clear_error(out):
    """Before: AttributeError / IndexError from inside the mixing kernels."""
    hc = hyper_connections(nn.Linear(16, 16), streams=2, call=out)
    with pytest.raises(TypeError, match="branch"):
        hc(torch.randn(3, 2, 16))


def test_channels_first_conv_block_is_refused_unless_call_moves_the_channels():
    """Stream tensors keep C last; a Conv2d block read them channels-first and, for H = C, computed a
    wrong answer without error. With call= moving the channels it is x + F(x)."""
    torch.manual_seed(0)
    blk = _ConvBlock(8).eval()
    with pytest.raises(ValueError, match="channels"):
        hyper_connections(blk, streams=4)
    call = lambda u: blk(u.movedim(-1, 1)).movedim(1, -1)  # noqa: E731
    hc = _zero_gates(hyper_connections(blk, streams=4, call=call))
    x = torch.randn(2, 8, 8, 8)  # (B, H, W, C), H = W = C
    torch.testing.assert_close(reduce_streams(hc(expand_streams(x, 4))), x + call(x))
    for cout, stride in ((16, 1), (8, 2)):  # channel count or stride changed: not a residual branch
        conv = nn.Conv2d(8, cout, 3, stride, 1)
        hc = hyper_connections(conv, streams=4, call=lambda u: conv(u.movedim(-1, 1)).movedim(1, -1))
        with pytest.raises(ValueError):
            hc(expand_streams(x, 4))


@pytest.mark.parametrize("kwargs,word", [(dict(width=16.5), "width"), (dict(branch_sensitivity=-1.0), "sensitivity"),
                                         (dict(branch_output_bound=-1.0), "branch_output_bound"),
                                         (dict(streams=True), "streams")])
def test_bad_options_raise(kwargs, word):
    """A fractional width was truncated, a negative branch constant gave a negative claimed sensitivity,
    streams=True failed inside torch.eye."""
    kwargs = {"streams": 4, **kwargs}
    with pytest.raises(ValueError, match=word):
        hyper_connections(nn.Linear(16, 16), **kwargs)


def test_hyper_branch_sensitivity_must_be_finite_and_non_negative():
    with pytest.raises(ValueError, match="sensitivity"):
        HyperBranch(nn.Linear(8, 8), sensitivity=float("nan"))


# ----------------------------------------------------------------------------- diagnostics
def _pair(d=8, n=3, order=("mlp", "attn")):
    torch.manual_seed(0)
    layers = {k: hyper_connections(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)), streams=n, constrained=False)
              for k in order}
    for hc in layers.values():
        with torch.no_grad():
            hc.static.weight[2 * n:].add_(torch.randn(n * n))
        _zero_gates(hc)
    return nn.ModuleDict(layers)


class _Reordered(nn.Module):
    """Registers the mlp layer first, runs attention first (a dict built in another order)."""

    def __init__(self):
        super().__init__()
        self.blocks = _pair()

    def forward(self, x):
        return reduce_streams(self.blocks["mlp"](self.blocks["attn"](expand_streams(x, 3))))


class _Tied(nn.Module):
    """One layer applied twice (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.blocks = _pair(order=("h",))

    def forward(self, x):
        h = self.blocks["h"]
        return reduce_streams(h(h(expand_streams(x, 3))))


def _gains(H):
    return float(H.abs().sum(-1).max()), float(H.abs().sum(-2).max())


@pytest.mark.parametrize("model", [_Reordered, _Tied])
def test_stability_report_composes_in_execution_order_on_a_plain_nn_module(model):
    """Before: certify=True (the default) raised AttributeError on a model that is not a
    modula_mhc Module, and the composite was built in registration order, one entry per layer."""
    net = model()
    r = stability_report(net, batch=torch.randn(2, 4, 8))
    assert r["certificate"] is None
    if model is _Reordered:
        expected = net.blocks["mlp"].static_residual() @ net.blocks["attn"].static_residual()
    else:
        expected = net.blocks["h"].static_residual() @ net.blocks["h"].static_residual()
    assert len(r["layers"]) == 2
    got = (r["final_composite_forward_gain"], r["final_composite_backward_gain"])
    assert got == pytest.approx(_gains(expected), rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_and_optimizer_resume_are_bit_exact_with_a_foreign_branch():
    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)

    def build(seed):
        torch.manual_seed(seed)
        attn = _GQA(8, heads=2, kv=1)
        net = nn.ModuleDict({"attn": attn, "hc": hyper_connections(attn, streams=3, depth=2)})
        return net, mm.adapt(net)

    def step(net, opt):
        loss = (reduce_streams(net["hc"](expand_streams(x, 3))) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    net, adapted = build(0)
    opt = mm.optim.DualizeRetract(adapted, lr=0.3)
    for _ in range(2):
        step(net, opt)
    ckpt = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, ckpt)
    twin, adapted2 = build(1)
    state = torch.load(io.BytesIO(ckpt.getvalue()), weights_only=False)
    twin.load_state_dict(state["model"])
    opt2 = mm.optim.DualizeRetract(adapted2, lr=0.3)
    opt2.load_state_dict(state["opt"])
    for _ in range(2):
        step(net, opt)
        step(twin, opt2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_plain_hyper_connections_accepts_foreign_module_and_checks_width():
    with pytest.raises(ValueError, match="width"):
        HyperConnections(nn.Linear(16, 16), streams=2, width=8)(torch.randn(3, 2, 16))


# ----------------------------------------------------------------------------- certified constants
def test_certify_bounds_a_foreign_pre_norm_branch_where_streams_cancel():
    """A foreign RMSNorm → Linear (‖W‖₂ = 1) branch declared 1-Lipschitz at unit RMS, at unit-RMS
    streams that nearly cancel in u = Σ h_pre_j x_j: F amplifies by 1/RMS(u). The certified
    constant was the unit-RMS one (1.13) against a measured 14.1."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight.div_(torch.linalg.matrix_norm(lin.weight, 2))
    hc = hyper_connections([_RMSNorm(8), lin], streams=4, constrained=False, depth=4).double()
    with torch.no_grad():  # φ inside the domain ‖φ‖ ≤ 1
        hc.phi.weight.div_(max(1.0, float(torch.linalg.matrix_norm(hc.phi.weight * hc.phi.gain, 2))))
    g = torch.Generator().manual_seed(1)
    a, b = (unit_rms(torch.randn(2, 1, 8, generator=g, dtype=torch.float64)) for _ in range(2))
    x = torch.cat([a, -a, b, -0.9 * b - 0.1 * a], dim=-2)
    x = unit_rms(x)
    cert = mm.claims.certify(hc, x)
    measured = mm.claims.measure_sensitivity(hc, x, restarts=1, steps=10, move_input=False)
    assert float(measured) > 2
    assert float(measured) <= cert.certified["sensitivity"] * (1 + 1e-6)
    # and the batch is out of the domain of the claimed constant (the branch's norm reads RMS(u) < 1):
    # it was reported in domain, with the claim 1.13 exceeded by the measured 14.1
    assert not cert.in_domain and any("pre-norm branch input RMS" in v for v in cert.violations), cert.violations
