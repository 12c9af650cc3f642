"""Numbers against claims: measured sensitivity, well-normedness and sharpness never exceed the
analytic values, on random and adversarial (power-iteration / dualized) directions at
well-normed weights (on their manifolds) and well-normed inputs (unit RMS per token)."""
import math

import pytest
import torch

from modula_mhc import atoms, bonds, compounds
from modula_mhc.algebra import Parallel

from _claims import input_jvp, input_second, mixed_second, power_direction, random_like_params, scale_to, seq_norm, unit_rms, weight_jvp, weight_second

SLACK = 1 + 1e-6


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return unit_rms(torch.randn(shape, generator=g, dtype=torch.float64))


def _qkv(shape, seed=0):
    return tuple(_x(shape, seed + i) for i in range(3))


CASES = {
    "linear": (lambda: atoms.Linear(24, 40), lambda: _x((5, 24))),
    "linear-wide": (lambda: atoms.Linear(40, 24), lambda: _x((5, 40))),
    "gain": (lambda: atoms.Gain(24), lambda: _x((5, 24))),
    "bias+linear": (lambda: atoms.Linear(24, 16, bias=True), lambda: _x((5, 24))),
    "gelu": (lambda: bonds.GELU(width=24), lambda: _x((5, 24))),
    "silu": (lambda: bonds.SiLU(width=24), lambda: _x((5, 24))),
    "relu": (lambda: bonds.ReLU(width=24), lambda: _x((5, 24))),
    "abs": (lambda: bonds.Abs(width=24), lambda: _x((5, 24))),
    "rmsnorm": (lambda: bonds.RMSNorm(eps=0.0), lambda: _x((5, 24))),
    "meansubtract": (lambda: bonds.MeanSubtract(), lambda: _x((5, 24))),
    "rope": (lambda: bonds.Rope(), lambda: _x((2, 7, 16))),
    "softmax": (lambda: atoms.Linear(6, 6) @ bonds.Softmax(scale=2.0), lambda: _x((4, 6))),
    "attention-core": (lambda: bonds.AttentionCore(heads=2), lambda: _qkv((2, 7, 16))),
    "attention-core-hot": (lambda: bonds.AttentionCore(heads=2, temperature=4.0), lambda: _qkv((2, 7, 16))),
    "attention-core-1head": (lambda: bonds.AttentionCore(heads=1, rope=False), lambda: _qkv((2, 7, 8))),
    "merge-split": (lambda: bonds.MergeHeads() @ bonds.SplitHeads(2), lambda: _x((2, 7, 16))),
    "split-heads": (lambda: bonds.SplitHeads(4), lambda: _x((2, 7, 16))),
    "rope-split": (lambda: bonds.Rope() @ bonds.SplitHeads(4), lambda: _x((2, 7, 16))),
    "mlp": (lambda: compounds.MLP(24, 12, 32, 3), lambda: _x((5, 24))),
    "mlp-depth1": (lambda: compounds.MLP(24, 12, 32, 1), lambda: _x((5, 24))),
    "resmlp": (lambda: compounds.ResMLP(24, 12, 32, 3), lambda: _x((5, 24))),
    "attention": (lambda: compounds.Attention(16, 2), lambda: _x((2, 7, 16))),
    "block": (lambda: compounds.Block(16, 2, depth=2, attn_manifold="euclidean", mlp_manifold="euclidean"),
              lambda: _x((2, 7, 16))),
    "sum": (lambda: atoms.Linear(16, 16) + (bonds.GELU() @ atoms.Linear(16, 16)), lambda: _x((5, 16))),
}


def build(name):
    torch.manual_seed(0)
    make_net, make_x = CASES[name]
    return make_net().double(), make_x()


def _directions(f, x, n=4):
    outs = []
    for s in range(n):
        g = torch.Generator().manual_seed(100 + s)
        if isinstance(x, tuple):
            outs.append(tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in x))
        else:
            outs.append(torch.randn(x.shape, generator=g, dtype=x.dtype))
    outs.append(power_direction(f, x))
    return [scale_to(d, 1.0) for d in outs]


@pytest.mark.parametrize("name", sorted(CASES))
def test_sensitivity_bounds_measured_input_lipschitz(name):
    net, x = build(name)
    nu = float(net.sensitivity)
    worst = 0.0
    for dx in _directions(net, x):
        worst = max(worst, seq_norm(input_jvp(net, x, dx)).item())
    assert worst <= nu * SLACK, f"{name}: measured {worst:.4f} > claimed sensitivity {nu:.4f}"
    assert worst > 0.02 * nu or nu == 0, f"{name}: measured {worst} is suspiciously far below {nu}"


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n][0]().atoms()))
def test_well_normed_weight_jvp(name):
    """‖∇_w M · Δw‖ ≤ ‖Δw‖_M for random and dualized Δw."""
    net, x = build(name)
    dirs = [random_like_params(net, seed=s) for s in range(3)]
    dirs.append(net.dualize(random_like_params(net, seed=9)))
    for dw in dirs:
        out = seq_norm(weight_jvp(net, x, dw)).item()
        assert out <= net.norm(dw).item() * SLACK


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharpness_bounds_hessian_vector_products(name):
    net, x = build(name)
    alpha, beta, gamma = (float(v) for v in net.sharpness)
    dxs = _directions(net, x, n=3)
    # gamma: input-input second derivative
    if math.isfinite(gamma):
        for dx, dx2 in zip(dxs, dxs[1:] + dxs[:1]):
            v = seq_norm(input_second(net, x, dx, dx2)).item()
            assert v <= gamma * seq_norm(dx).item() * seq_norm(dx2).item() * SLACK, f"gamma {v} > {gamma}"
    if not net.atoms():
        return
    dws = [random_like_params(net, seed=s) for s in range(2)] + [net.dualize(random_like_params(net, seed=7))]
    if math.isfinite(alpha):
        for dw, dw2 in zip(dws, dws[1:] + dws[:1]):
            v = seq_norm(weight_second(net, x, dw, dw2)).item()
            assert v <= alpha * net.norm(dw).item() * net.norm(dw2).item() * SLACK + 1e-12, f"alpha {v} > {alpha}"
    if math.isfinite(beta):
        for dw, dx in zip(dws, dxs):
            v = seq_norm(mixed_second(net, x, dw, dx)).item()
            assert v <= beta * net.norm(dw).item() * seq_norm(dx).item() * SLACK + 1e-12, f"beta {v} > {beta}"


@pytest.mark.parametrize("H", [1, 2, 4, 16])
def test_split_heads_sensitivity_is_sqrt_heads_in_per_head_rows(H):
    """The split tensor (…, H, T, d) is measured in per-head rows (max over heads and tokens of the
    RMS over d): a token change living in one head grows by √H, and nothing grows more."""
    from modula_mhc.claims import measure_sensitivity

    d = 4
    sh = bonds.SplitHeads(H).double()
    assert float(sh.sensitivity) == pytest.approx(math.sqrt(H))
    dx = torch.zeros(2, 5, H * d, dtype=torch.float64)
    dx[..., :d] = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(H), dtype=torch.float64)
    worst = float(seq_norm(input_jvp(sh, _x((2, 5, H * d)), dx)) / seq_norm(dx))
    assert worst == pytest.approx(math.sqrt(H))
    for f in (sh, (bonds.Rope() @ bonds.SplitHeads(H)).double()):
        m = float(measure_sensitivity(f, _x((2, 5, H * d), seed=H), restarts=2, steps=15, seed=H))
        assert math.sqrt(H) * (1 - 1e-6) <= m <= float(f.sensitivity) * SLACK, (H, m, float(f.sensitivity))


@pytest.mark.parametrize("H,tau", [(1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (16, 1.0), (4, 4.0)])
def test_head_split_attention_chain_within_its_constants(H, tau):
    """MergeHeads @ AttentionCore(1) @ (SplitHeads(H) ×3) is self-attention with H heads. The
    one-head core on split rows (RMS up to √H) is off its declared domain: its certified local
    constant times SplitHeads' √H bounds the chain, and the fused core's constant is unchanged."""
    from modula_mhc.claims import certify, measure_sensitivity

    d = 4
    chain = (bonds.MergeHeads() @ bonds.AttentionCore(1, causal=False, temperature=tau)
             @ Parallel(*(bonds.SplitHeads(H) for _ in range(3)))).double()
    core = bonds.AttentionCore(H, causal=False, temperature=tau)
    assert float(core.sensitivity) == max(math.sqrt(H), tau * H)
    assert float(compounds.Attention(2 * H * d, H).sensitivity) == pytest.approx(H)
    x = _x((2, 5, H * d), seed=H)
    torch.testing.assert_close(chain(x), core((x, x, x)))
    cert = certify(chain, x)
    m_fixed = float(measure_sensitivity(chain, x, restarts=2, steps=25, move_input=False, seed=1))
    assert m_fixed <= cert.certified["sensitivity"] * SLACK, (m_fixed, cert.certified)
    # over every unit-RMS input the split rows have RMS ≤ √H: chain ≤ 3·√H·max(1, τH)
    m = float(measure_sensitivity(chain, x, restarts=3, steps=40, seed=0))
    assert m <= 3 * math.sqrt(H) * max(1.0, tau * H) * SLACK
    assert m <= 3 * float(core.sensitivity) * SLACK, (m, float(core.sensitivity))


def test_gpt_well_normed_and_dualize_target():
    torch.manual_seed(0)
    gpt = compounds.GPT(vocab_size=17, context=8, width=16, depth=2, heads=2, attn_manifold="euclidean",
                        mlp_manifold="euclidean").double()
    idx = torch.randint(0, 17, (2, 8))
    for s in range(3):
        dw = random_like_params(gpt, seed=s)
        assert seq_norm(weight_jvp(gpt, idx, dw)).item() <= gpt.norm(dw).item() * SLACK
    for t in (0.1, 1.0, 3.0):
        upd = gpt.dualize(random_like_params(gpt, seed=5), target_norm=t)
        assert gpt.norm(upd).item() == pytest.approx(t, rel=1e-4)


@pytest.mark.parametrize("name", ["mlp", "resmlp", "attention", "block", "bias+linear", "sum"])
def test_dualize_hits_target_and_maximises_inner_product(name):
    net, _ = build(name)
    g = random_like_params(net, seed=3)
    for t in (0.05, 1.0, 4.0):
        upd = net.dualize(g, target_norm=t)
        assert net.norm(upd).item() == pytest.approx(t, rel=1e-4)
    upd = net.dualize(g, target_norm=1.0)
    best = sum((a * b).sum() for a, b in zip(g, upd)).item()
    assert best > 0
    # any other direction of modular norm 1 has a smaller inner product with g
    for s in range(5):
        d = random_like_params(net, seed=50 + s)
        n = net.norm(d)
        d = [t / n for t in d]
        assert sum((a * b).sum() for a, b in zip(g, d)).item() <= best * (1 + 1e-3)
    # including the naive candidate: each atom's gradient rescaled to its target norm
    coeffs = net.norm_coefficients()
    naive = [gi / (c * a.weight_norm(gi)) for gi, c, a in zip(g, coeffs, net.atoms())]
    assert net.norm(naive).item() == pytest.approx(1.0, rel=1e-6)
    assert sum((a * b).sum() for a, b in zip(g, naive)).item() <= best * (1 + 1e-3)


@pytest.mark.parametrize("name", ["mlp", "resmlp", "block", "bias+linear"])
def test_zero_gradient_gives_zero_update(name):
    net, _ = build(name)
    upd = net.dualize([torch.zeros_like(p) for p in net.parameters()], target_norm=1.0)
    for u in upd:
        assert torch.isfinite(u).all() and torch.count_nonzero(u) == 0


def test_tuple_sensitivity_adds():
    net = Parallel(atoms.Linear(8, 8), 2.0 * atoms.Linear(8, 8))
    assert net.sensitivity == 3.0
    x = _x((3, 8))
    net = net.double()
    for dx in _directions(net, x):
        assert seq_norm(input_jvp(net, x, dx)).item() <= 3.0 * SLACK


def test_scalar_multiplication_follows_modula():
    """`M * a` scales the input (Modula's M(a·x)), `a * M` the output; `M / a` divides the output."""
    x = _x((3, 8))
    g = bonds.GELU()
    assert torch.allclose((g * 2.0)(x), torch.nn.functional.gelu(2 * x))
    assert torch.allclose((2.0 * bonds.GELU())(x), 2 * torch.nn.functional.gelu(x))
    assert torch.allclose((bonds.GELU() / 2.0)(x), torch.nn.functional.gelu(x) / 2)
    lin = atoms.Linear(8, 8)
    assert (lin * 3.0).sensitivity == 3.0 and (lin * 3.0).norm_coefficients() == [1.0]
    assert (3.0 * atoms.Linear(8, 8)).norm_coefficients() == [3.0]
    with pytest.raises(TypeError):
        atoms.Linear(8, 8) * atoms.Linear(8, 8)
