"""Audit of the compounds at configurations the other tests do not use: construction errors,
stream counts 1, 2, 3, 8, the init claims of docs/mhc.md, recompute and the per-layer bound."""
import pytest
import torch

from modula_mhc import claims
from modula_mhc.compounds import GPT
from modula_mhc.compounds.gpt import mlp_branch
from modula_mhc.compounds.hyper import ExpandStreams, HyperConnections

from _claims import unit_rms

SMALL = dict(vocab_size=11, context=8, width=8, depth=1, heads=1)


# ----------------------------------------------------------------------------- construction errors
@pytest.mark.parametrize("make, word", [
    (lambda: GPT(**{**SMALL, "depth": True}, residual="mhc"), "depth"),
    (lambda: GPT(**{**SMALL, "heads": True}), "heads"),
    (lambda: HyperConnections(mlp_branch(8), depth=True), "depth"),
    (lambda: HyperConnections(mlp_branch(8), sinkhorn_iters=True), "sinkhorn_iters"),
    (lambda: ExpandStreams(True), "streams"),
])
def test_a_bool_is_not_a_count(make, word):
    """True is an int in Python: GPT(depth=True) built a depth-1 GPT and sinkhorn_iters=True ran one
    Sinkhorn iteration, silently."""
    with pytest.raises(ValueError, match=word):
        make()


def test_sinkhorn_max_iters_is_checked_at_construction():
    """sinkhorn_max_iters=0 was accepted and failed only at the first forward pass, inside the kernel."""
    with pytest.raises(ValueError, match="sinkhorn_max_iters"):
        HyperConnections(mlp_branch(8), sinkhorn_tol=1e-6, sinkhorn_max_iters=0)


@pytest.mark.parametrize("ratio", [0, -1, 0.3])
def test_mlp_ratio_that_gives_no_integer_hidden_width_names_mlp_ratio(ratio):
    """mlp_ratio·width is the MLP's hidden width; 0 or 0.3·8 = 2.4 failed inside Linear with a
    message about Linear's dimensions, not about the GPT argument."""
    with pytest.raises(ValueError, match="mlp_ratio"):
        GPT(**SMALL, mlp_ratio=ratio)


def test_a_fractional_mlp_ratio_with_an_integer_hidden_width_is_fine():
    gpt = GPT(**SMALL, mlp_ratio=0.5)  # hidden width 4
    assert torch.isfinite(gpt(torch.randint(0, 11, (1, 4)))).all()


# ----------------------------------------------------------------------------- init claims (docs/mhc.md)
def _layer_coefficients(gpt, idx):
    layers = [m for m in gpt.modules() if isinstance(m, HyperConnections)]
    out = []
    hooks = [layer.register_forward_hook(lambda mod, inp, _: out.append(mod.coefficients(inp[0]))) for layer in layers]
    with torch.no_grad():
        gpt(idx)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("streams", [2, 3, 8])
def test_init_coefficients_stay_within_the_documented_distance(streams):
    """mHC: diagonal ≥ 0.945, |Σh_pre − 1|, |h_post − 1| < 0.02; HC: |Σh_pre − 1| ≤ n·gate_scale and
    |h_post − 1|, |H_ii − 1| ≤ gate_scale (|tanh| ≤ 1), at widths and stream counts besides n = 4."""
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 16))
    mhc = GPT(vocab_size=50, context=16, width=8, depth=2, heads=1, residual="mhc", streams=streams).double()
    for q, p, H in _layer_coefficients(mhc, idx):
        assert H.diagonal(dim1=-2, dim2=-1).min() >= 0.945
        assert (q.sum(-1) - 1).abs().max() < 0.02 and (p - 1).abs().max() < 0.02
    hc = GPT(vocab_size=50, context=16, width=8, depth=2, heads=1, residual="hc", streams=streams).double()
    a = 0.01
    for q, p, H in _layer_coefficients(hc, idx):
        assert (q.sum(-1) - 1).abs().max() <= streams * a + 1e-12
        assert (p - 1).abs().max() <= a + 1e-12
        assert (H.diagonal(dim1=-2, dim2=-1) - 1).abs().max() <= a + 1e-12


@pytest.mark.parametrize("residual, streams, options", [
    ("mhc", 3, dict(dynamic=False)), ("hc", 8, dict()), ("mhc", 2, dict(sinkhorn_tol=1e-9)), ("hc", 1, dict(dynamic=False)),
])
def test_recompute_is_bit_identical_in_other_configurations(residual, streams, options):
    torch.manual_seed(1)
    kw = dict(vocab_size=11, context=8, width=8, depth=1, heads=2, residual=residual, streams=streams, **options)
    a, b = GPT(**kw).double(), GPT(**kw, recompute=True).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # coefficients away from their symmetric init
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            if "static" in name or "gate" in name:
                d = torch.randn(pa.shape, generator=g, dtype=pa.dtype)
                pa.add_(d)
                pb.add_(d)
    idx = torch.randint(0, 11, (2, 4))
    ya, yb = a(idx), b(idx)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(ya, yb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


# ----------------------------------------------------------------------------- per-layer bound
@pytest.mark.parametrize("streams, constrained, dynamic", [
    (1, True, True), (2, False, True), (3, True, False), pytest.param(8, True, True, marks=pytest.mark.slow)])
def test_layer_sensitivity_at_copied_streams_below_declared_and_certified(streams, constrained, dynamic):
    """At copied unit-RMS streams (ExpandStreams), the adversary's best ratio stays ≤ the certified
    constant, and ≤ the declared one where certify says the batch is in the domain."""
    torch.manual_seed(0)
    hc = HyperConnections(mlp_branch(8), streams=streams, constrained=constrained, dynamic=dynamic, depth=4).double()
    g = torch.Generator().manual_seed(1)
    x = ExpandStreams(streams)(unit_rms(torch.randn(2, 3, 8, generator=g, dtype=torch.float64))).contiguous()
    cert = claims.certify(hc, x)
    measured = claims.measure_sensitivity(hc, x, restarts=1, steps=6, move_input=False).value
    assert measured <= cert.certified["sensitivity"] * (1 + 1e-6)
    if cert.in_domain:
        assert measured <= cert.claimed["sensitivity"] * (1 + 1e-6)
    kappa = claims.measure_weight_gain(hc, x, restarts=1, steps=4).value
    assert kappa <= cert.certified["weight_gain"] * (1 + 1e-6)
