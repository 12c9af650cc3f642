"""Symbolic queries agree with built networks when numbers are substituted."""
import math

import pytest
import sympy
import torch

import modula_mhc as mm
from modula_mhc import atoms, bonds, compounds
from modula_mhc.algebra import repeated_sharpness
from modula_mhc.symbolic import evaluate, layer_index, properties

d, L, h = sympy.symbols("d L h", positive=True, integer=True)


def _close(a, b, rel=1e-7):
    return abs(float(a) - float(b)) <= rel * max(1.0, abs(float(b)))


def _check(sym, net, **vals):
    assert _close(evaluate(sym["mass"], **vals), net.mass)
    assert _close(evaluate(sym["sensitivity"], **vals), net.sensitivity)
    for key, num in zip(("alpha", "beta", "gamma"), net.sharpness):
        assert _close(evaluate(sym["sharpness"][key], **vals), num, rel=1e-6), key


def _coefficients_by_role(sym, depth, **vals):
    out = []
    for entry in sym["norm_coefficients"].values():
        c = sympy.sympify(entry["coefficient"])
        if layer_index in c.free_symbols:
            out += [(entry["role"], evaluate(c.subs(layer_index, l), **vals)) for l in range(1, depth + 1)]
        else:
            out.append((entry["role"], evaluate(c, **vals)))
    return sorted(out, key=lambda rc: (rc[0] or "", rc[1]))


def _numeric_by_role(net):
    return sorted(((a.role, float(c)) for a, c in zip(net.atoms(), net.norm_coefficients())),
                  key=lambda rc: (rc[0] or "", rc[1]))


@pytest.fixture(scope="module")
def gpt_symbolic():
    return properties(compounds.GPT, vocab_size=65, context=64, width=d, depth=L, heads=4)


def test_gpt_symbolic_matches_built(gpt_symbolic):
    sym = gpt_symbolic
    assert sym["mass"].free_symbols == set()  # masses do not depend on width or depth
    assert L in sympy.sympify(sym["sensitivity"]).free_symbols
    for width, depth in ((32, 2), (64, 3)):
        net = compounds.GPT(vocab_size=65, context=64, width=width, depth=depth, heads=4)
        _check(sym, net, d=width, L=depth)
        got = _coefficients_by_role(sym, depth, d=width, L=depth)
        want = _numeric_by_role(net)
        assert [r for r, _ in got] == [r for r, _ in want]
        assert all(_close(a, b, 1e-6) for (_, a), (_, b) in zip(got, want))


def test_resmlp_and_mlp_symbolic_match_built():
    sym = properties(compounds.ResMLP, in_features=20, out_features=5, width=d, depth=L)
    for width, depth in ((16, 1), (32, 4)):
        _check(sym, compounds.ResMLP(20, 5, width, depth), d=width, L=depth)
    sym = properties(compounds.MLP, in_features=20, out_features=5, width=d, depth=L)
    for width, depth in ((16, 3), (32, 5)):
        _check(sym, compounds.MLP(20, 5, width, depth), d=width, L=depth)


def test_sensitivity_formula_in_depth_is_bounded(gpt_symbolic):
    """The plain-residual GPT's sensitivity (1 + c/L)^L stays below e^c at every depth; with H = 4 heads
    c = (H − 1)/2 + 0.0645 (since issue 12 the attention branch certifies ν = H, not 1; docs/algebra.md)."""
    sym = gpt_symbolic
    values = [evaluate(sym["sensitivity"], L=n) for n in (1, 2, 8, 64, 1024)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] < math.exp((4 - 1) / 2 + 0.0645)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_repeated_sharpness_closed_form_equals_fold(depth):
    block = mm.residual(atoms.Linear(8, 8) @ bonds.GELU() @ atoms.Linear(8, 8) @ bonds.RMSNorm(), 3)
    folded = (block ** depth).sharpness
    closed = repeated_sharpness(block.mass, block.sensitivity, block.sharpness, depth)
    for a, b in zip(closed, folded):
        assert _close(a, b, 1e-9)


def test_symbolic_atoms_allocate_nothing():
    net = atoms.Linear(d, 2 * d) @ bonds.GELU() @ atoms.Linear(16, d)
    assert list(net.parameters()) == []
    assert d in sympy.sympify(net.sharpness.gamma).free_symbols  # GELU's γ = √(2/π)·√d
    with pytest.raises(RuntimeError):
        (atoms.Linear(d, d) ** L)(torch.zeros(1, 3))
