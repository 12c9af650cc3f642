"""The fast paths of the optimizer step: same-shape Muon matrices dualized as one stack, and
Polar Express on the Gram matrix of a long matrix's short side. Both must give the answer of the
plain path (to fp32 rounding) and keep msign's guarantees on adversarial spectra."""
from __future__ import annotations

import pytest
import torch

from modula_mhc import atoms, compounds
from modula_mhc.kernels import reference as K
from modula_mhc.optim import DualizeRetract


def _spectrum_matrix(n, m, singular_values, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    return ((U * singular_values) @ V.mT).float()


@pytest.mark.parametrize("kind", ["gauss", "rank1", "rank2+tiny", "cond1e4", "cond1e7"])
@pytest.mark.parametrize("steps", [5, 7])
def test_gram_route_keeps_msign_bounds(kind, steps):
    """Aspect ≥ 3 takes the Gram route: singular values never exceed Polar Express's bound (a fp32
    Q·S₀·Qᵀ update blew rank-deficient inputs up to 1e7; the bounded T·S·T update must not), and
    the result matches the plain route."""
    n, m = 64, 256
    i = torch.arange(n, dtype=torch.float64)
    sv = {"gauss": None, "rank1": (i < 1).double(), "rank2+tiny": (i < 2).double() + 1e-7,
          "cond1e4": 10 ** (-4 * i / (n - 1)), "cond1e7": 10 ** (-7 * i / (n - 1))}[kind]
    X = torch.randn(n, m, generator=torch.Generator().manual_seed(5)) if sv is None else _spectrum_matrix(n, m, sv, 5)
    assert m >= K.GRAM_ROUTE_ASPECT * n
    Y = K.msign(X, steps)
    assert torch.isfinite(Y).all()
    s = torch.linalg.svdvals(Y.double())
    bound = 1.0 + (2e-3 if steps == 5 else 1e-4)
    assert s.max() <= bound
    # the plain route: the same start and polynomials step by step on the full matrix
    Z, S = K.msign_start(X.unsqueeze(0))
    for k, (a, b, c) in enumerate(K.msign_coeffs(steps)):
        Z = K._polar_express_step(Z, a, b, c, S=S if k == 0 else None)
    nuc = torch.linalg.svdvals(X.double()).sum()
    score = lambda A: float((A.double() * X.double()).sum() / nuc)  # noqa: E731
    assert abs(score(Y) - score(Z[0])) < 2e-3
    if kind == "gauss":  # well inside the design range: both are the polar factor to fp32 rounding
        assert (Y - Z[0]).abs().max() < 1e-4


def test_gram_route_tall_equals_transpose():
    X = torch.randn(300, 40, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(K.msign(X), K.msign(X.mT).mT, atol=1e-6)


def _gpt():
    torch.manual_seed(0)
    return compounds.GPT(vocab_size=13, context=8, width=16, depth=2, heads=2,
                         attn_manifold="euclidean", mlp_manifold="euclidean")


def _one_step(model, stacked):
    torch.manual_seed(1)
    x = torch.randint(0, 13, (3, 8))
    model(x).square().mean().backward()
    opt = DualizeRetract(model, lr=0.1)
    if not stacked:  # the unstacked reference: every atom dualized on its own
        from modula_mhc.optim import dualize_retract as dr
        orig, dr._batch_key = dr._batch_key, lambda atom, u: None
        try:
            opt.step()
        finally:
            dr._batch_key = orig
    else:
        opt.step()
    return opt


def test_stacked_muon_step_equals_per_matrix_step():
    a, b = _gpt(), _gpt()
    opt = _one_step(a, stacked=True)
    _one_step(b, stacked=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    # each stacked atom's state records the dualize (Muon: no dual iterations)
    linear = [p for p in a.parameters() if type(p._mm_atom()).__name__ == "Linear"]
    assert linear and all(opt.state[p]["iterations"] == 0 for p in linear)


def test_stacked_directions_have_each_atoms_target():
    """Atoms of one stack with different norm coefficients keep their own step targets."""
    torch.manual_seed(2)
    model = (atoms.Linear(8, 8) @ atoms.Linear(8, 8)) * 3.0
    x = torch.randn(4, 8)
    model(x).square().sum().backward()
    opt = DualizeRetract(model, lr=1.0, momentum=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, w0 in zip(model.parameters(), before):
        target = opt._targets[id(p)]
        step = torch.linalg.matrix_norm((p.detach() - w0).double(), ord=2)
        assert abs(float(step) - target) < 1e-3 * max(target, 1.0), (float(step), target)


@pytest.mark.parametrize("kind", ["gauss", "rank1", "cond1e4"])
@pytest.mark.parametrize("shape", [(96, 96), (160, 48), (48, 160), (512, 128)])
def test_euclidean_dualize_near_optimal_and_unit_bounded(kind, shape):
    """Muon's dualize (6 Polar Express steps after the tight start by default; 5, divided by their
    largest gain): ⟨G, A⟩ ≥ 0.99‖G‖_* against a float64 SVD and ‖A‖₂ ≤ 1 on Gaussian, rank-1 and
    condition-1e4 gradients; with 6 steps ‖A‖₂ = 1 (the modular norm of a dual is its target)."""
    from modula_mhc.manifolds import Euclidean
    m, n = shape
    k = min(m, n)
    i = torch.arange(k, dtype=torch.float64)
    sv = {"gauss": None, "rank1": (i < 1).double(), "cond1e4": 10 ** (-4 * i / (k - 1))}[kind]
    if sv is None:
        G = torch.randn(m, n, generator=torch.Generator().manual_seed(7))
    else:
        G = _spectrum_matrix(k, max(m, n), sv, 7)
        G = G.mT if m > n else G
    nuc = torch.linalg.svdvals(G.double()).sum()
    assert Euclidean().msign_steps == 6
    for steps in (5, 6):
        A = Euclidean(msign_steps=steps).dualize(torch.zeros_like(G), G).double()
        assert float((A * G.double()).sum() / nuc) >= 0.99
        top = float(torch.linalg.matrix_norm(A, ord=2))
        assert top <= 1 + 1e-5
        if steps == 6:
            assert top >= 1 - 1e-4


def test_low_precision_long_matrices_stay_finite():
    """bf16/fp16 never take the Gram route: its n×n loop turned low-rank bf16 inputs non-finite."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(2, 64, 2, generator=g) @ torch.randn(2, 2, 320, generator=g) + 1e-3 * torch.randn(2, 64, 320, generator=g)
    for dt in (torch.bfloat16, torch.float16):
        Y = K.msign(X.to(dt))
        assert Y.dtype == dt and torch.isfinite(Y).all()
        assert torch.linalg.svdvals(Y.double()).max() < 1.02


@pytest.mark.parametrize("name", __import__("modula_mhc").manifolds.names())
def test_in_place_step_equals_step(name):
    """``Manifold._step_`` (the optimizer's in-place move; Euclidean skips the temporary) lands
    where the public ``step`` does, on every registered manifold."""
    from modula_mhc import manifolds
    m = manifolds.get(name)
    g = torch.Generator().manual_seed(3)
    W = m.random((6, 6), generator=g)
    A = m.dualize(W, torch.randn(6, 6, generator=g))
    expected = m.step(W, A, 0.05)
    W_inplace = W.clone()
    assert m._step_(W_inplace, A, 0.05) is None
    assert torch.allclose(W_inplace, expected, atol=1e-6)
    assert not torch.equal(W_inplace, W)


def _hetero_gpt():
    torch.manual_seed(0)
    return compounds.GPT(vocab_size=13, context=8, width=16, depth=2, heads=2,
                         attn_manifold="stiefel", mlp_manifold="dgram")


def test_stacked_hetero_step_keeps_each_atoms_state():
    """Same-shape Stiefel and DGram weights are dualized as one stack (``stacks_members``), each
    with its own state: per-atom iterations (an int), certified, its own certificate, and from the
    second step a warm start from it (DGram; square Stiefel is closed-form); the same iteration
    counts as dualizing each atom on its own."""
    model = _hetero_gpt()
    opt = _one_step(model, stacked=True)
    grams = [p for p in model.parameters() if getattr(p._mm_atom().manifold, "stacks_members", False)]
    dgram = [p for p in grams if p._mm_atom().manifold.name == "dgram"]
    assert len(grams) >= 4 and len(dgram) >= 2
    for step in range(2):
        torch.manual_seed(10 + step)
        model.zero_grad()
        model(torch.randint(0, 13, (3, 8))).square().mean().backward()
        # the per-atom reference, from copies of the same states (the stack must not change them)
        alone = {}
        for p in dgram:
            st = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
            u = p.grad.lerp(opt.state[p]["momentum_buffer"].lerp(p.grad, 0.05), 0.95)  # Nesterov, β = 0.95
            p._mm_atom().manifold.dualize(p.detach(), u, st)
            alone[p] = st["iterations"]
        opt.step()
        for p in grams:
            st = opt.state[p]
            assert isinstance(st["iterations"], int) and isinstance(st["certified"], bool) and st["certified"]
        assert all(opt.state[p]["warm_start"] for p in dgram)
        assert {p: opt.state[p]["iterations"] for p in dgram} == alone
    certificates = {float(opt.state[p]["certificate"].abs().sum()) for p in grams}
    assert len(certificates) == len(grams)       # each member kept its own multiplier


def test_a_stacked_solve_does_not_wait_for_its_slowest_member():
    """Members leave the stacked solve once certified: an easy member's iteration count is its own
    (alone it takes the same), not the hard member's."""
    from modula_mhc.manifolds import DGram
    g = torch.Generator().manual_seed(3)
    M = DGram()
    W = torch.stack([M.random((48, 16), generator=g, dtype=torch.float64) for _ in range(2)])
    easy = W[0] @ (0.1 * torch.randn(16, 16, generator=g, dtype=torch.float64)) \
        + 1e-3 * torch.randn(48, 16, generator=g, dtype=torch.float64)
    hard = torch.randn(48, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 16, generator=g, dtype=torch.float64) \
        + 3e-3 * torch.randn(48, 16, generator=g, dtype=torch.float64)
    G = torch.stack([easy, hard])
    alone = []
    for j in range(2):
        st = {}
        M.dualize(W[j], G[j], st)
        alone.append(st["iterations"])
    states = [{}, {}]
    A = M._dualize_stack(W, G, states)
    together = [st["iterations"] for st in states]
    assert alone[0] < alone[1] and together[0] < together[1], (alone, together)
    assert abs(together[0] - alone[0]) <= 2, (alone, together)
    for j in range(2):
        assert states[j]["certified"]
        assert abs(float(torch.linalg.matrix_norm(A[j], 2)) - 1) < 1e-9
