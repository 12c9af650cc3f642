"""Bond behaviour: rotary embedding orientation, masks, attention scaling, activation constants."""
import math

import pytest
import torch

from modula_mhc import atoms, bonds
from modula_mhc.bonds.attention import attention_reference


def test_rope_is_the_complex_rotation():
    torch.manual_seed(0)
    T, d = 5, 8
    x = torch.randn(T, d, dtype=torch.float64)
    y = bonds.Rope(base=100.0)(x)
    half = d // 2
    z = torch.complex(x[:, :half], x[:, half:])
    theta = torch.arange(T, dtype=torch.float64)[:, None] * 100.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rotated = z * torch.exp(1j * theta)  # counter-clockwise rotation by +θ: (x1 cos − x2 sin, x1 sin + x2 cos)
    assert torch.allclose(y[:, :half], rotated.real) and torch.allclose(y[:, half:], rotated.imag)
    # position 0 is unrotated; norms are preserved
    assert torch.allclose(y[0], x[0])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    d = 16
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rope = bonds.Rope()
    Q = rope(q.expand(12, d))
    K = rope(k.expand(12, d))
    s = Q @ K.T
    assert torch.allclose(s[3, 1], s[7, 5]) and torch.allclose(s[9, 9], s[2, 2])
    assert not torch.allclose(s[3, 1], s[1, 3])


def test_causal_mask_and_softmax():
    s = torch.randn(4, 4)
    m = bonds.CausalMask()(s)
    assert torch.isinf(m.triu(1)[m.triu(1) != 0]).all()
    assert torch.equal(m.tril(), s.tril())
    p = bonds.Softmax(scale=2.0)(m)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    assert torch.count_nonzero(p.triu(1)) == 0
    assert bonds.Softmax(scale=-4.0).sensitivity == 2.0


def test_attention_core_uses_one_over_d_scaling():
    torch.manual_seed(2)
    B, T, H, d = 2, 6, 2, 4
    q, k, v = (torch.randn(B, T, H * d, dtype=torch.float64) for _ in range(3))
    core = bonds.AttentionCore(heads=H, causal=True, rope=False)
    out = core((q, k, v))
    split = lambda t: t.reshape(B, T, H, d).transpose(1, 2)
    ref = attention_reference(split(q), split(k), split(v), True, 1.0 / d).transpose(1, 2).reshape(B, T, H * d)
    assert torch.allclose(out, ref)
    scores = split(q) @ split(k).transpose(-1, -2) / d
    manual = torch.softmax(scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf), -1) @ split(v)
    assert torch.allclose(out, manual.transpose(1, 2).reshape(B, T, H * d))


def test_split_merge_heads_round_trip():
    x = torch.randn(2, 5, 12)
    s = bonds.SplitHeads(3)(x)
    assert s.shape == (2, 3, 5, 4)
    assert torch.equal(bonds.MergeHeads()(s), x)
    with pytest.raises(ValueError):
        bonds.SplitHeads(5)(x)
    with pytest.raises(ValueError):
        bonds.SplitHeads(0)


@pytest.mark.parametrize("W,H", [(1, 1), (3, 1), (5, 1), (12, 4), (6, 2)])
def test_attention_core_rope_refuses_odd_head_width(W, H):
    """Rope pairs the halves of each head: an odd head width is no rotation (width 3 came out 4
    wide, width 1 scaled q by cos θ, width 5 failed with a broadcasting error)."""
    from modula_mhc.algebra import Parallel
    from modula_mhc.bonds.attention import apply_rope, rope_tables

    x = torch.randn(2, 4, W)
    with pytest.raises(ValueError, match="even head width"):
        bonds.AttentionCore(H)((x, x, x))
    with pytest.raises(ValueError, match="even head width"):   # width known at composition
        bonds.AttentionCore(H) @ Parallel(*(atoms.Linear(W, W) for _ in range(3)))
    with pytest.raises(ValueError, match="even"):
        rope_tables(4, W // H, 10000.0, x.device, x.dtype)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(4, W // H), torch.ones(4, 1), torch.zeros(4, 1))
    assert bonds.AttentionCore(H, rope=False)((x, x, x)).shape == x.shape   # no rope: any width
    with pytest.raises(ValueError, match="not divisible"):
        bonds.AttentionCore(H + 1 if W % (H + 1) else H + 2, rope=False)((x, x, x))


def test_attention_core_docstring_states_its_constants():
    doc = " ".join(bonds.AttentionCore.__doc__.split())
    assert "max(√H, τH)" in doc and "6·H^(5/2)·max(1, τ)²" in doc and "max(1, τ) and" not in doc
    c = bonds.AttentionCore(8, temperature=2.0)
    assert float(c.sensitivity) == 16.0
    assert float(c.sharpness.gamma) == pytest.approx(6 * 8 ** 2.5 * 4)


@pytest.mark.parametrize("bond,f", [(bonds.GELU, torch.nn.functional.gelu), (bonds.SiLU, torch.nn.functional.silu)])
def test_activation_constants_are_the_true_maxima(bond, f):
    x = torch.linspace(-12, 12, 400001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert g.abs().max().item() == pytest.approx(bond.lipschitz, rel=1e-6)
    assert h.abs().max().item() == pytest.approx(bond.curvature, rel=1e-6)
    assert bond(width=16).sharpness.gamma == pytest.approx(bond.curvature * 4)
    assert math.isinf(bond().sharpness.gamma)  # width unknown: no finite bound claimed


def test_rmsnorm_and_mean_subtract():
    x = torch.randn(3, 10) * 5
    y = bonds.RMSNorm()(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-5)
    z = bonds.MeanSubtract()(x)
    assert torch.allclose(z.mean(-1), torch.zeros(3), atol=1e-6)


def test_concat_and_add():
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    assert bonds.Concat()((a, b)).shape == (2, 8)
    assert torch.equal(bonds.Add()((a, a)), 2 * a)
