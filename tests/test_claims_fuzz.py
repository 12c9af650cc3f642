"""Defects a random-network fuzzer found in the stated constants and in their measurement.

Each test is a minimal network on which a stated constant (or the estimator that checks it)
disagreed with the truth: the symbolic depth formulas with the built networks, the weight
estimators with exact forward-mode derivatives.
"""
import pytest
import sympy
import torch

from modula_mhc import atoms, claims, compounds

from _claims import seq_norm, weight_jvp

L = sympy.Symbol("L", positive=True, integer=True)


def _value(expr, subs):
    return float(sympy.sympify(expr).subs(subs).doit())


@pytest.mark.parametrize("make, subs, depth", [
    # Attention(1 head, τ = 3): ν = ν' = 3 as sympy Floats, whose ratio 1.0 sympy's == does not
    # equal to 1, so (r^L − 1)/(L(r − 1)) was 0/0 and α nan (built: 12.05)
    (lambda w: compounds.Attention(w, 1, temperature=3.0), {}, 2),
    # symbolic heads: r = max(√H, H) is 1 at H = 1 only after substitution (α nan, built 19.88)
    (lambda w: compounds.Attention(w, sympy.Symbol("H", positive=True, integer=True), rope=False), {"H": 1}, 3),
])
def test_symbolic_repeat_weight_gain_matches_built(make, subs, depth):
    d = sympy.Symbol("d", positive=True, integer=True)
    width = d if not subs else 16
    sym = atoms.Linear(width, width) @ make(width) ** L
    built_inner = compounds.Attention(16, 1, temperature=3.0) if not subs else compounds.Attention(16, 1, rope=False)
    built = atoms.Linear(16, 16) @ built_inner ** depth
    point = {L: depth, d: 16, **{sympy.Symbol(k, positive=True, integer=True): v for k, v in subs.items()}}
    for s, b in zip(sym.sharpness, built.sharpness):
        assert _value(s, point) == pytest.approx(float(b), rel=1e-9)


def test_symbolic_repeat_weight_gain_is_finite_at_ratio_one():
    H = sympy.Symbol("H", positive=True, integer=True)
    rep = compounds.Attention(16, H, rope=False) ** L
    built = compounds.Attention(16, 1, rope=False) ** 3
    assert _value(rep.weight_gain, {H: 1, L: 3}) == pytest.approx(float(built.weight_gain))
    built2 = compounds.Attention(16, 2, rope=False) ** 3
    assert _value(rep.weight_gain, {H: 2, L: 3}) == pytest.approx(float(built2.weight_gain))


def _tiny_chain():
    torch.manual_seed(0)
    net = ((0.5 * 1e-6) * atoms.Linear(8, 8)) ** 4  # coefficients down to 2.5e-25: Δw entries up to ~1e24
    return net.double(), claims.unit_rms(torch.randn(4, 8, dtype=torch.float64))


def test_weight_gain_estimator_scales_its_step():
    net, x = _tiny_chain()
    m = claims.measure_weight_gain(net, x, restarts=1, steps=6)
    exact = float(seq_norm(weight_jvp(net, x, list(m.directions[0]))) / net.norm(m.directions[0]))
    assert m.value == pytest.approx(exact, rel=1e-4)  # was 5e19 against an exact 0.25
    assert claims.certify(net, x).in_domain
    assert m.value <= float(net.weight_gain) * (1 + 1e-6)


@pytest.mark.parametrize("which", ["alpha", "beta"])
def test_weight_sharpness_estimator_scales_its_step(which):
    net, x = _tiny_chain()
    m = claims.measure_sharpness(net, x, which, restarts=1, steps=4)
    stated = float(getattr(net.sharpness, which))
    assert m.value <= stated * (1 + 1e-3)  # were 1.2e28 (α, stated 1e18) and 5e21 (β, stated 0.25)
