"""What a PyTorch user meets in the first hour (issue 14): clear errors at the boundaries, duals
that do not depend on the gradient's scale, a readable print(model), a light import."""
import math
import os
import subprocess
import sys

import pytest
import torch

import modula_mhc as mm
from modula_mhc import atoms, bonds, compounds
from modula_mhc.algebra import Identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_CALLS = {
    # constructors: widths, depths, heads and masses that are not finite positive numbers
    "Linear(inf, 4)": lambda: atoms.Linear(math.inf, 4),
    "Embed(nan, 4)": lambda: atoms.Embed(math.nan, 4),
    "Gain(10**400)": lambda: atoms.Gain(10 ** 400),
    "Conv2d kernel inf": lambda: atoms.Conv2d(1, 1, math.inf),
    "Conv2d stride 0": lambda: atoms.Conv2d(1, 1, 3, stride=0),
    "Conv2d padding -1": lambda: atoms.Conv2d(1, 1, 3, padding=-1),
    "SplitHeads(inf)": lambda: bonds.SplitHeads(math.inf),
    "GPT width inf": lambda: compounds.GPT(11, 8, math.inf, 2, 2),
    "GPT depth inf": lambda: compounds.GPT(11, 8, 8, math.inf, 2),
    "GPT heads inf": lambda: compounds.GPT(11, 8, 8, 2, math.inf),
    "GPT mlp_ratio inf": lambda: compounds.GPT(11, 8, 8, 2, 2, mlp_ratio=math.inf),
    "GPT streams inf": lambda: compounds.GPT(11, 8, 8, 2, 2, residual="mhc", streams=math.inf),
    "GPT blocks_mass nan": lambda: compounds.GPT(11, 8, 8, 2, 2, blocks_mass=math.nan),
    "MLP depth inf": lambda: compounds.MLP(4, 2, width=8, depth=math.inf),
    "M ** inf": lambda: atoms.Linear(4, 4) ** math.inf,
    "residual depth nan": lambda: mm.residual(atoms.Linear(4, 4), math.nan),
    "residual depth 10**400": lambda: mm.residual(atoms.Linear(4, 4), 10 ** 400),
    "inf * M": lambda: math.inf * atoms.Linear(4, 4),
    "M / 0": lambda: atoms.Linear(4, 4) / 0,
    # calls with something that is not a suitable tensor
    "GPT(list)": lambda: compounds.GPT(11, 8, 8, 1, 2)([1, 2, 3]),
    "GPT(0-dim)": lambda: compounds.GPT(11, 8, 8, 1, 2)(torch.tensor(3)),
    "GPT(token >= vocab)": lambda: compounds.GPT(11, 8, 8, 1, 2)(torch.full((2, 4), 11)),
    "Embed(-1)": lambda: atoms.Embed(11, 8)(torch.tensor([-1])),
    "Linear(0-dim)": lambda: atoms.Linear(4, 3)(torch.tensor(1.0)),
    "Linear(None)": lambda: atoms.Linear(4, 3)(None),
    "Gain wrong width": lambda: atoms.Gain(4)(torch.zeros(2, 3)),
    "Mean(1-dim)": lambda: bonds.Mean()(torch.zeros(3)),
    "Flatten(0-dim)": lambda: bonds.Flatten()(torch.tensor(1.0)),
    "RMSNorm(None)": lambda: bonds.RMSNorm()(None),
    "MergeHeads(None)": lambda: bonds.MergeHeads()(None),
    "Add(tensor)": lambda: bonds.Add()(torch.zeros(3)),
    "norm([1.0])": lambda: atoms.Linear(4, 3).norm([1.0]),
    "dualize target nan": lambda: atoms.Linear(4, 3).dualize([torch.ones(3, 4)], target_norm=math.nan),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_value_or_type_error(name):
    """Only ValueError/TypeError (no OverflowError, ZeroDivisionError, AttributeError, IndexError),
    with a one-line message."""
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[name]()
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize("mass", [math.nan, math.inf, -math.inf, -1.0, 10 ** 400, "1"])
def test_atom_mass_must_be_a_finite_non_negative_number(mass):
    with pytest.raises(ValueError, match="mass must be a finite number"):
        atoms.Linear(4, 4, mass=mass)
    atom = atoms.Bias(4)
    with pytest.raises(ValueError, match="mass must be a finite number"):
        atom.mass = mass
    assert atom.mass == 1.0


@pytest.mark.parametrize("make", [lambda: atoms.Bias(6), lambda: atoms.Embed(5, 6), lambda: atoms.Gain(6),
                                  lambda: atoms.Linear(6, 4)], ids=["Bias", "Embed", "Gain", "Linear"])
def test_duals_do_not_depend_on_the_gradient_scale(make):
    """The dual of s·G is the dual of G for s from 1e-30 to 1e30 (float32 squares of such entries
    under- or overflow unless G is rescaled first)."""
    atom = make()
    G = torch.randn(atom.weight.shape, generator=torch.Generator().manual_seed(0))
    G[0] = 0.0  # a zero row stays zero (Embed) and changes nothing elsewhere
    reference = atom.dualize_weight(G, 1.0)
    assert float(atom.weight_norm(reference)) == pytest.approx(1.0, rel=1e-2)
    for exponent in range(-30, 31, 5):
        scaled = atom.dualize_weight(G * 10.0 ** exponent, 1.0)
        assert torch.allclose(scaled, reference, rtol=1e-4, atol=1e-6), exponent


def test_add_refuses_mismatched_widths():
    """Known widths: refused when composed. Widths not known then (a branch of Identity/ReLU inside
    a sub-tree built before its width was): refused when run, never broadcast."""
    with pytest.raises(ValueError, match="widths"):
        bonds.Add() @ (atoms.Linear(3, 2), atoms.Linear(3, 4))
    net = bonds.Add() @ (bonds.Add() @ (Identity(), bonds.ReLU()), atoms.Linear(8, 1))
    with pytest.raises(ValueError, match="different shapes"):
        net(torch.randn(5, 8))
    same = bonds.Add() @ (bonds.Add() @ (Identity(), bonds.ReLU()), atoms.Linear(8, 8))
    assert same(torch.randn(5, 8)).shape == (5, 8)


def test_gpt_zero_dim_input_gets_its_own_error():
    with pytest.raises(ValueError, match=r"GPT\(context=8\) expects a tensor with at least 1 dimension"):
        compounds.GPT(11, 8, 8, 1, 2)(torch.tensor(3))


def test_norm_of_a_symbolic_module_is_refused():
    sympy = pytest.importorskip("sympy")
    d = sympy.Symbol("d", positive=True, integer=True)
    with pytest.raises(ValueError, match="symbolic dimensions"):
        atoms.Linear(d, 3).norm()
    assert float(mm.symbolic.describe(atoms.Linear(d, 3))["mass"]) == 1.0


def test_sparse_gradient_reaches_its_dedicated_error():
    """A sparse gradient (nn.Embedding(sparse=True) style) gets the optimizer's TypeError naming
    sparse gradients, not an error from the finite check that runs torch.isfinite on it."""
    net = atoms.Embed(10, 4)
    opt = mm.optim.DualizeRetract(net, lr=0.1)
    net.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (10, 4),
                                                check_invariants=True)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_print_of_a_gpt_is_compact():
    """Containers are spliced into their parents and numbers rounded: a 2-block GPT fits on a
    screen (it took 62 lines up to 111 characters wide)."""
    text = repr(compounds.GPT(65, 64, 64, 2, 4))
    lines = text.splitlines()
    assert len(lines) <= 35 and max(map(len, lines)) <= 80, text
    assert "ModuleList" not in text and "0.4166666" not in text
    assert "Linear(64, 256, mass=0.4167, role=mlp_in)" in text  # constructor order: in, out
    assert "(1-2): 2 x Block(" in text and "0.25 × Compose(" in text


def test_import_does_not_load_sympy():
    """sympy (~0.4 s to import) loads only with modula_mhc.symbolic or a symbolic dimension."""
    code = ("import sys, modula_mhc as mm; assert 'sympy' not in sys.modules, 'sympy imported';"
            "mm.compounds.GPT(11, 8, 8, 2, 2); assert 'sympy' not in sys.modules, 'sympy by GPT';"
            "mm.symbolic; assert 'sympy' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
