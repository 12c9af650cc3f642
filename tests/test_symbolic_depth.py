"""Issue 12: symbolic queries equal the built numbers at every depth ≥ 1 (∞ where the built module
has ∞), and constructions that need numbers say so."""
import math

import pytest
import sympy

from modula_mhc import compounds
from modula_mhc.symbolic import evaluate, layer_index, properties

d, L = sympy.symbols("d L", positive=True, integer=True)


def _same(a, b):
    a, b = float(a), float(b)
    if math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _check_values(sym, net, **vals):
    assert _same(evaluate(sym["mass"], **vals), net.mass)
    assert _same(evaluate(sym["sensitivity"], **vals), net.sensitivity)
    for key, num in zip(("alpha", "beta", "gamma"), net.sharpness):
        got = evaluate(sym["sharpness"][key], **vals)
        assert _same(got, num), (key, got, num, vals)


def _coefficients(entries, **vals):
    out = []
    for e in entries.values():
        n = int(evaluate(e.get("copies", 1), **vals))
        c = sympy.sympify(e["coefficient"])
        out += [(e["role"] or "", evaluate(c.subs(layer_index, l), **vals)) for l in range(1, n + 1)]
    return sorted(out)


def _check_coefficients(sym, net, depth, **vals):
    entries = sym["norm_coefficients"] if depth >= sym["valid_from"] else sym["at_depth"][depth]["norm_coefficients"]
    got = _coefficients(entries, L=depth, **vals)
    want = sorted((a.role or "", float(c)) for a, c in zip(net.atoms(), net.norm_coefficients()))
    assert [r for r, _ in got] == [r for r, _ in want], depth
    assert all(_same(a, b) for (_, a), (_, b) in zip(got, want)), (depth, got, want)


@pytest.mark.parametrize("act", ["gelu", "relu", "abs"])
def test_mlp_symbolic_equals_built_at_every_depth(act):
    """Before: at L = 2 alpha was zoo and beta nan (the repeated hidden block has 0 copies); with
    ReLU/Abs every sharpness was nan while the built network has ∞; depth 1 listed atoms (a hidden
    and an output Linear) that a depth-1 MLP does not have."""
    sym = properties(compounds.MLP, in_features=8, out_features=4, width=d, depth=L, activation_fn=act)
    for depth in (1, 2, 3, 4, 6):
        net = compounds.MLP(8, 4, 16, depth, activation_fn=act)
        _check_values(sym, net, L=depth, d=16)
        _check_coefficients(sym, net, depth, d=16)
    if act != "gelu":
        assert evaluate(sym["sharpness"]["gamma"], L=9, d=16) == math.inf
    assert sym["valid_from"] == 2 and set(sym["at_depth"]) == {1}
    # the general entry for the hidden block says how many copies exist: L − 2 (none at L = 2)
    hidden = [e for e in sym["norm_coefficients"].values() if e["role"] == "mlp_hidden"]
    assert len(hidden) == 1 and sympy.simplify(hidden[0]["copies"] - (L - 2)) == 0


def test_resmlp_and_gpt_symbolic_equal_built_at_depths_1_to_4():
    sym = properties(compounds.ResMLP, in_features=12, out_features=3, width=d, depth=L)
    for depth in (1, 2, 3, 4):
        net = compounds.ResMLP(12, 3, 8, depth)
        _check_values(sym, net, L=depth, d=8)
        _check_coefficients(sym, net, depth, d=8)
    sym = properties(compounds.GPT, vocab_size=11, context=8, width=16, depth=L, heads=2)
    for depth in (1, 2, 3, 4):
        net = compounds.GPT(11, 8, 16, depth, 2)
        _check_values(sym, net, L=depth)
        _check_coefficients(sym, net, depth)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_hyper_connected_gpt_cannot_be_symbolic_and_says_why(residual):
    for kw in (dict(width=d, depth=2), dict(width=16, depth=L)):
        with pytest.raises(ValueError, match="cannot be built with symbolic .*numeric width and depth"):
            properties(compounds.GPT, vocab_size=11, context=8, heads=2, residual=residual, **kw)


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_infinite_sharpness_stays_infinite_past_the_sampled_depths(a):
    """(a·(Linear @ ReLU))**L: the closed form has ∞ terms that cancel to nan only once a depth is
    substituted; the built network's sharpness is ∞ at every depth ≥ 2, and so must the formula be
    (it gave nan at L ≥ 5)."""
    from modula_mhc import atoms, bonds

    def net(width, depth, a):
        return (a * (atoms.Linear(width, width) @ bonds.ReLU())) ** depth
    p = properties(net, width=d, depth=L, a=a)
    for depth in (3, 5, 6, 50):
        built = net(8, depth, a).sharpness
        for k, b in zip(("alpha", "beta", "gamma"), built):
            assert _same(evaluate(p["sharpness"][k], d=8, L=depth), float(b)), (k, depth)
