"""The module algebra: construction rules, errors, PyTorch behaviour."""
import math

import pytest
import torch

import modula_mhc as mm
from modula_mhc import atoms, bonds, compounds


def small_net():
    return atoms.Linear(64, 10) @ bonds.ReLU() @ atoms.Linear(784, 64)


def test_quickstart_numbers():
    net = small_net()
    assert net.mass == 2
    assert net.sensitivity == 1
    y = net(torch.randn(5, 784))
    assert y.shape == (5, 10)
    # parameters align with atoms, input side first
    assert [tuple(p.shape) for p in net.parameters()] == [(64, 784), (10, 64)]
    assert [a.weight for a in net.atoms()] == list(net.parameters())


def test_norm_coefficients_composition_rule():
    net = small_net()
    # M2 ∘ M1 with unit masses and sensitivities: both coefficients μ/μ_i·ν_after = 2
    assert net.norm_coefficients() == [2.0, 2.0]
    w1, w2 = net.parameters()
    expect = max(2 * torch.linalg.matrix_norm(w1, 2), 2 * torch.linalg.matrix_norm(w2, 2))
    assert torch.allclose(net.norm(), expect, rtol=1e-5)
    # scalar multiple: coefficient |a| (abs, not a), sensitivity |a|
    s = -3.0 * atoms.Linear(8, 8)
    assert s.sensitivity == 3.0 and s.norm_coefficients() == [3.0]
    # composition with a scaled second module: ν2 enters w1's coefficient
    c = (0.5 * atoms.Linear(8, 8)) @ atoms.Linear(8, 8)
    assert c.norm_coefficients() == pytest.approx([0.5 * 2, 0.5 * 2])


def test_sum_and_tuple_rules():
    a, b = atoms.Linear(8, 8), atoms.Linear(8, 8, mass=3.0)
    s = a + b
    assert s.mass == 4.0 and s.sensitivity == 2.0
    assert s.norm_coefficients() == pytest.approx([4.0, 4.0 / 3.0])
    with pytest.raises(ValueError, match="16"):  # Concat of two width-8 outputs has width 16
        atoms.Linear(8, 4) @ bonds.Concat() @ (atoms.Linear(8, 8), atoms.Linear(8, 8))
    with pytest.raises(ValueError, match="width"):
        bonds.Add() @ (atoms.Linear(3, 2), atoms.Linear(3, 4))
    t = atoms.Linear(16, 4) @ bonds.Concat() @ (atoms.Linear(8, 8), atoms.Linear(8, 8))
    assert t(torch.randn(3, 8)).shape == (3, 4)


def test_shape_mismatch_is_a_construction_error():
    with pytest.raises(ValueError, match=r"64.*10|10.*64"):
        atoms.Linear(10, 5) @ atoms.Linear(784, 64)
    with pytest.raises(ValueError, match="width"):
        atoms.Linear(10, 5) @ bonds.GELU() @ atoms.Linear(3, 7)
    with pytest.raises(ValueError):
        atoms.Linear(8, 8) + atoms.Linear(8, 4)
    with pytest.raises(TypeError):
        atoms.Linear(8, 8) @ torch.nn.Linear(8, 8)
    with pytest.raises(ValueError):
        atoms.Linear(0, 8)
    with pytest.raises(ValueError):
        atoms.Linear(8, 8, manifold="banana")
    with pytest.raises(ValueError):
        atoms.Linear(8, 8, mass=-1)
    with pytest.raises(ValueError):
        atoms.Linear(8, 8) ** 0
    with pytest.raises(ValueError):
        compounds.GPT(vocab_size=65, context=16, width=30, depth=2, heads=4)
    with pytest.raises(ValueError):
        compounds.GPT(vocab_size=65, context=16, width=32, depth=2, heads=4, residual="weird")
    with pytest.raises(ValueError):
        compounds.MLP(4, 4, 8, 0)


def test_zero_mass_never_divides_by_zero():
    net = bonds.ReLU() @ bonds.Identity()
    assert net.mass == 0 and net.norm().item() == 0 and net.dualize([]) == []
    frozen = atoms.Linear(8, 8, mass=0.0) @ bonds.GELU() @ atoms.Linear(8, 8)
    assert frozen.norm_coefficients()[1] == math.inf
    upd = frozen.dualize([torch.randn(8, 8), torch.randn(8, 8)], target_norm=1.0)
    assert torch.count_nonzero(upd[1]) == 0 and torch.isfinite(upd[0]).all()
    assert torch.isfinite(frozen.norm()) and torch.isfinite(torch.tensor(frozen.sharpness.alpha))
    zero_scaled = 0.0 * atoms.Linear(8, 8)
    assert zero_scaled.norm_coefficients() == [math.inf]
    assert zero_scaled.sharpness == (0.0, 0.0, 0.0)


def test_power_makes_independent_copies():
    block = atoms.Linear(16, 16) @ bonds.GELU()
    deep = block ** 3
    ws = list(deep.parameters())
    assert len(ws) == 3 and not torch.equal(ws[0], ws[1])
    assert deep.mass == 3
    assert deep.sensitivity == pytest.approx(bonds.GELU.lipschitz ** 3)
    # every copy's parameter knows its own atom
    assert [p._mm_atom() for p in ws] == deep.atoms()


def test_residual_keeps_sensitivity_one():
    for L in (1, 2, 8, 32):
        r = mm.residual(atoms.Linear(16, 16) @ bonds.RMSNorm(), L)
        assert r.sensitivity == pytest.approx(1.0)
        deep = r ** L
        assert deep.sensitivity == pytest.approx(1.0)
        assert deep.mass == L


def test_linear_with_bias_is_its_own_atom():
    lin = atoms.Linear(8, 4, bias=True)
    assert isinstance(lin, mm.Sum) and len(lin.atoms()) == 2
    assert isinstance(lin.atoms()[1], atoms.Bias)
    assert lin.mass == 2 and lin.sensitivity == 1
    x = torch.randn(3, 8)
    with torch.no_grad():
        lin.atoms()[1].weight.fill_(0.5)
    assert torch.allclose(lin(x), lin.atoms()[0](x) + 0.5)
    g = [torch.randn(4, 8), torch.randn(4)]
    upd = lin.dualize(g, target_norm=0.3)
    assert lin.norm(upd).item() == pytest.approx(0.3, rel=1e-4)


def test_pytorch_behaviour_state_dict_to_autocast():
    net = compounds.MLP(12, 3, 16, 3)
    sd = net.state_dict()
    net2 = compounds.MLP(12, 3, 16, 3)
    net2.load_state_dict(sd)
    x = torch.randn(4, 12)
    assert torch.equal(net(x), net2(x))
    net64 = net2.to(torch.float64)
    assert net64(x.double()).dtype == torch.float64
    assert [p._mm_atom() for p in net64.parameters()] == net64.atoms()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16


def test_gpt_builds_and_runs():
    gpt = compounds.GPT(vocab_size=65, context=16, width=32, depth=2, heads=4)
    idx = torch.randint(0, 65, (2, 16))
    logits = gpt(idx)
    assert logits.shape == (2, 16, 65)
    assert gpt.mass == pytest.approx(1 + 5 + 1)
    with pytest.raises(ValueError):
        gpt(torch.randint(0, 65, (2, 17)))
    roles = sorted({a.role for a in gpt.atoms()})
    assert roles == ["attn_k", "attn_o", "attn_q", "attn_v", "embed", "head", "mlp_in", "mlp_out"]


def test_gpt_is_causal():
    gpt = compounds.GPT(vocab_size=11, context=8, width=16, depth=1, heads=2, attn_manifold="euclidean",
                        mlp_manifold="euclidean")
    idx = torch.randint(0, 11, (1, 8))
    idx2 = idx.clone()
    idx2[0, 5:] = (idx2[0, 5:] + 1) % 11
    a, b = gpt(idx), gpt(idx2)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_conv2d_atom():
    conv = atoms.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 10, 10)
    assert conv(x).shape == (2, 8, 10, 10)
    g = torch.randn_like(conv.weight)
    (upd,) = conv.dualize([g], target_norm=0.7)
    assert conv.norm([upd]).item() == pytest.approx(0.7, rel=1e-3)
    net = atoms.Linear(8, 10) @ bonds.Flatten() @ bonds.Mean(dim=-1) @ bonds.Mean(dim=-1) @ conv
    assert net(x).shape == (2, 10)


def test_gain_and_embed_norms():
    gain = atoms.Gain(6)
    (u,) = gain.dualize([torch.tensor([1.0, -2.0, 0.0, 3.0, -0.1, 0.0])], target_norm=0.5)
    assert torch.equal(u, torch.tensor([0.5, -0.5, 0.0, 0.5, -0.5, 0.0]))
    emb = atoms.Embed(10, 8)
    assert emb.norm().item() == pytest.approx(1.0, rel=1e-5)
    g = torch.zeros(10, 8)
    g[3] = torch.randn(8)
    (u,) = emb.dualize([g], target_norm=2.0)
    assert u[3].pow(2).mean().sqrt().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.count_nonzero(u[:3]) == 0
    with pytest.raises(TypeError):
        emb(torch.randn(2, 3))
