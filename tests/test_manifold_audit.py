"""Adversarial audit of the manifold operations (modula_mhc/manifolds), checked against maths
computed here, independently of the library's own helpers:

1. ``retract``/``random``/``step`` land in the manifold's own ``contains`` for float64/float32/
   bf16/fp16, scales 1e-20…1e20, rank-1, 1×n, n×1, wide, tall, square, batched and transposed
   input, lr = 0, huge and negative lr — or raise a ValueError (never NaN/inf, never a raw
   linalg error);
2. ``dualize`` is tangent (measured here), has the claimed norm and reaches the optimum computed
   here in float64 (nuclear norm / projected norms; for Stiefel and DGram the reported certificate
   rechecked with an SVD), on rank-1, condition-1e4/1e8, 1e±30-scaled, zero and exactly normal
   gradients; non-finite gradients raise ValueError;
3. Birkhoff: doubly stochastic after retract and step (extreme inputs, n = 1…32, bf16), tangent
   unit-norm directions;
4. the stated containment tolerances;
5. warm-start state across shape/dtype changes and empty state.

Defects found in the Stiefel/DGram solver files are tested here too (zero columns, non-finite or
absurd warm starts, the certificate's symmetry, bf16 gaps, Stiefel's step domain).
"""
import math

import pytest
import torch

from modula_mhc import manifolds
from modula_mhc.manifolds import Birkhoff, DGram, Euclidean, Oblique, Sphere, Stiefel
from modula_mhc.manifolds.base import CONTAINS_TOL, containment_tol

# One thread (conftest.one_thread): The claims here are maths that no thread count changes, on
# tensors too small for a second thread to help: it only contends for the cores (this file: 15 s
# either way on an idle 2-core machine, 103 s with 2 threads and 38 s with 1 on a busy one).
pytestmark = pytest.mark.usefixtures("one_thread")


ALL = ["euclidean", "stiefel", "dgram", "oblique", "sphere", "birkhoff"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _off(H):
    return H - torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1))


def _tall(X):
    return X.mT if X.size(-2) < X.size(-1) else X


def _spectrum(shape, cond, g):
    """A float64 matrix (batched) with singular values log-spaced from 1 down to 1/cond."""
    m, n = shape[-2:]
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(shape[:-2] + (m, k), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[:-2] + (n, k), generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64) if k > 1 else torch.ones(1, dtype=torch.float64)
    return U @ torch.diag_embed(s) @ V.mT


def _gradients(shape, g):
    m, n = shape[-2:]
    return {
        "gauss": torch.randn(shape, generator=g, dtype=torch.float64),
        "rank1": torch.randn(shape[:-1] + (1,), generator=g, dtype=torch.float64)
        @ torch.randn(shape[:-2] + (1, n), generator=g, dtype=torch.float64),
        "cond1e4": _spectrum(shape, 1e4, g),
        "cond1e8": _spectrum(shape, 1e8, g),
    }


# ----------------------------------------------------------------------------- 1. retract / step
RETRACT_SHAPES = [(1, 5), (5, 1), (3, 7), (7, 3), (6, 6), (2, 4, 6), (3, 5, 5)]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_retract_lands_on_the_manifold_or_refuses_rank_deficient_input(name, dtype):
    m = manifolds.get(name)
    g = _gen(1)
    for shape in RETRACT_SHAPES:
        if name == "birkhoff" and shape[-1] != shape[-2]:
            continue
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        rank1 = torch.randn(shape[:-1] + (1,), generator=g, dtype=torch.float64) \
            @ torch.randn(shape[:-2] + (1, shape[-1]), generator=g, dtype=torch.float64)
        transposed = torch.randn(shape[:-2] + shape[-2:][::-1], generator=g, dtype=torch.float64).mT  # non-contiguous
        for kind, X in (("gauss", base), ("rank1", rank1), ("transposed", transposed)):
            for scale in (1e-20, 1.0, 1e20):
                Y = (X * scale).to(dtype)
                if not bool(torch.isfinite(Y).all()) or not bool((Y != 0).any()):
                    continue  # fp16 cannot hold 1e±20
                try:
                    W = m.retract(Y)
                except ValueError:
                    # the polar factor of a rank-deficient matrix is not unique (documented)
                    assert name in ("stiefel", "dgram") and kind == "rank1" and min(shape[-2:]) > 1, (kind, shape, scale)
                    continue
                assert W.dtype == dtype and W.shape == Y.shape
                assert m.contains(W), (name, kind, shape, scale, dtype)
                if name == "birkhoff":
                    assert bool((W >= 0).all())


@pytest.mark.parametrize("name", ALL)
def test_step_lands_on_the_manifold_at_any_lr_or_raises_value_error(name):
    """lr = 0 returns W (to its rounding); lr up to 1e300 and negative lr give a point on the manifold
    or a ValueError. Before: Sphere/Oblique/Stiefel formed W − lr·A in fp16 (inf from |lr·A| ≈ 6.6e4:
    Sphere returned NaN, Oblique zero columns, Stiefel a raw linalg error), float32 overflowed at
    lr = 1e39, and Birkhoff at lr < 0 returned a matrix off the polytope (marginals off by up to 0.36)."""
    m = manifolds.get(name)
    never_raises = name in ("sphere", "oblique", "birkhoff")
    for shape in [(6, 6), (8, 4), (4, 8), (1, 5), (2, 5, 5)]:
        if name == "birkhoff" and shape[-1] != shape[-2]:
            continue
        for dtype in DTYPES:
            g = _gen(3)
            W = m.random(shape, generator=g, dtype=dtype)
            A = m.dualize(W, torch.randn(shape, generator=g).to(dtype))
            for lr in (0.0, 1e-8, 0.5, 1e4, 1e5, 1e8, 1e39, 1e300, -1.0, -1e39):
                try:
                    W2 = m.step(W, A, lr)
                except ValueError:
                    assert not never_raises, (shape, dtype, lr)
                    assert abs(lr) >= 1e4, (shape, dtype, lr)  # only steps beyond any training lr
                    continue
                assert W2.dtype == dtype
                assert bool(torch.isfinite(W2).all()), (shape, dtype, lr)
                assert m.contains(W2), (shape, dtype, lr)
                if lr == 0.0:
                    err = float((W2.double() - W.double()).abs().max())
                    assert err <= 8 * torch.finfo(dtype).eps, (shape, dtype, err)


def test_sphere_and_oblique_huge_steps_equal_their_limits():
    """retract ignores scale, so a step of lr → ∞ tends to retract(−A): checked in float64."""
    g = _gen(5)
    for m in (Sphere(), Oblique()):
        W = m.random((6, 4), generator=g, dtype=torch.float64)
        A = m.dualize(W, torch.randn(6, 4, generator=g, dtype=torch.float64))
        for lr in (1e20, 1e300):
            assert torch.allclose(m.step(W, A, lr), m.retract(-A), atol=1e-12)
            assert torch.allclose(m.step(W, A, -lr), m.retract(A), atol=1e-12)
        W32 = W.float()
        assert torch.allclose(m.step(W32, A.float(), 1e39).double(), m.retract(-A), atol=1e-6)


def test_half_precision_step_is_formed_in_float32():
    """W − lr·A used to be rounded in fp16/bf16 before the retraction; the retraction of the float32
    difference, rounded once, is what every dtype should get (and fp16 no longer overflows)."""
    g = _gen(7)
    for m in (Sphere(), Oblique(), Stiefel(), DGram()):
        W = m.random((8, 4), generator=g, dtype=torch.float16)
        A = m.dualize(W, torch.randn(8, 4, generator=g).half())
        for lr in (0.1, 3e4):
            ref = m.retract(W.float() - lr * A.float()).half()
            out = m.step(W, A, lr)
            if lr < 1:  # the same float32 arithmetic, rounded once
                assert torch.equal(out, ref), type(m).__name__
            else:  # Sphere/Oblique form (W − lr·A)/lr: the same point to fp16 rounding
                err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
                assert bool(torch.isfinite(out).all()) and err <= torch.finfo(torch.float16).eps, type(m).__name__


@pytest.mark.parametrize("name", ALL)
def test_empty_tensors_are_refused_with_a_value_error(name):
    m = manifolds.get(name)
    for shape in [(0, 4), (4, 0), (0, 4, 4)]:
        X = torch.zeros(shape)
        for call in (lambda: m.dualize(X, X), lambda: m.retract(X), lambda: m.contains(X), lambda: m.norm(X)):
            with pytest.raises(ValueError):
                call()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_contains_refuses_non_finite_points(name, bad):
    """DGram.contains(NaN matrix) was True: unit_columns set NaN columns to zero."""
    m = manifolds.get(name)
    W = m.random((5, 5), generator=_gen(0))
    W[1, 2] = bad
    assert not m.contains(W)
    assert not m.contains(torch.full((5, 5), bad))


# ----------------------------------------------------------------------------- 2. dualize
DUAL_SHAPES = [(1, 5), (5, 1), (3, 7), (7, 3), (6, 6), (48, 12), (12, 48), (2, 8, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_euclidean_dualize_against_the_nuclear_norm(dtype):
    """⟨G, A⟩ ≥ 0.99‖G‖_* (SVD, float64) and ‖A‖₂ = 1 on rank-1 and condition-1e4/1e8 gradients at
    1e±30; bf16: the returned A is rounded to bf16, so ‖A‖₂ is 1 to HALF_TOL_EPS·eps (1.0025 seen)."""
    E = Euclidean()
    tol = containment_tol(torch.zeros(1, dtype=dtype), None) if dtype in HALF else 1e-4
    for shape in DUAL_SHAPES:
        for kind, G in _gradients(shape, _gen(5)).items():
            for scale in (1e-30, 1.0, 1e30):
                Gs = (G * scale).to(dtype)
                A = E.dualize(torch.zeros_like(Gs), Gs).double()
                Gd = Gs.double()
                top = torch.linalg.matrix_norm(A, 2)
                assert bool(((top - 1).abs() <= tol).all()), (shape, kind, scale, top)
                ratio = (A * Gd).sum((-2, -1)) / torch.linalg.svdvals(Gd).sum(-1)
                assert bool((ratio >= 0.99 - tol).all()), (shape, kind, scale, ratio)


def test_euclidean_vector_norm_does_not_overflow():
    v = torch.full((10,), 1e20)
    assert math.isclose(float(Euclidean().norm(v)), math.sqrt(10) * 1e20, rel_tol=1e-6)
    assert math.isclose(Euclidean().diagnostics(v)["norm"], math.sqrt(10) * 1e20, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["sphere", "oblique"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sphere_and_oblique_dualize_reach_the_exact_optimum(name, dtype):
    """The optimum over the unit ball of the natural norm, computed here: ‖P_T G‖_F (sphere) and
    Σ_j ‖(I − w_jw_jᵀ)g_j‖ (oblique). W itself at scales 1e-20…1e20 (a 1e20 W overflowed ‖W‖ in
    Sphere.dualize's float32: the direction was 0.06–0.19 off the tangent space)."""
    m = manifolds.get(name)
    for shape in DUAL_SHAPES:
        g = _gen(9)
        W0 = m.random(shape, generator=g, dtype=torch.float64)
        for kind, G in _gradients(shape, g).items():
            for wscale in (1e-20, 1.0, 1e20):
                for gscale in (1e-30, 1.0, 1e30):
                    A = m.dualize((W0 * wscale).to(dtype), (G * gscale).to(dtype)).double()
                    Gd = (G * gscale).to(dtype).double()
                    if name == "sphere":
                        w = W0 / W0.norm()
                        T = Gd - w * (w * Gd).sum()
                        opt, tangency, size = T.norm(), (w * A).sum().abs(), A.norm()
                    else:
                        Wt, Gt, At = _tall(W0), _tall(Gd), _tall(A)
                        w = Wt / Wt.norm(dim=-2, keepdim=True)
                        T = Gt - w * (w * Gt).sum(-2, keepdim=True)
                        opt, tangency, size = T.norm(dim=-2).sum(), (w * At).sum(-2).abs().max(), At.norm(dim=-2).max()
                    tol = 1e-5 if dtype == torch.float32 else 1e-10
                    if float(opt) <= 1e-6 * float(Gd.norm()):  # (1, 1): no tangent space
                        assert float(A.abs().max()) == 0.0
                        continue
                    assert float(tangency) <= tol and abs(float(size) - 1) <= tol, (shape, kind, wscale, gscale)
                    assert float((A * Gd).sum() / opt) >= 1 - tol, (shape, kind, wscale, gscale)


def _exactly_normal(name, W, g):
    """A gradient with no tangent part at W, exact in W's dtype (powers of two for half precision)."""
    Wd, shape = W.double(), tuple(W.shape)
    wide, k = shape[-2] < shape[-1], min(shape[-2:])
    Wt = Wd.mT if wide else Wd
    half = W.dtype in HALF
    if name == "sphere":
        return (2.0 if half else 3.7) * Wd
    if name == "oblique":
        d = 2.0 ** torch.randint(-3, 4, shape[:-2] + (k,), generator=g).double()
        N = Wt * d.unsqueeze(-2)
    elif name == "stiefel":
        if half:
            return 2.0 * Wd
        S = torch.randn(shape[:-2] + (k, k), generator=g, dtype=torch.float64)
        N = Wt @ (S + S.mT)
    elif name == "dgram":  # normal space W·Λ, Λ symmetric with zero diagonal
        S = torch.randn(shape[:-2] + (k, k), generator=g, dtype=torch.float64)
        N = Wt @ _off(S + S.mT)
    else:  # birkhoff: a1ᵀ + 1bᵀ, small integers
        n = shape[-1]
        return torch.randint(-3, 4, shape[:-1] + (1,), generator=g).double() + torch.randint(-3, 4, shape[:-2] + (1, n), generator=g).double()
    return N.mT if wide else N


@pytest.mark.parametrize("name", ["stiefel", "dgram", "oblique", "sphere", "birkhoff"])
def test_zero_and_exactly_normal_gradients_give_exactly_zero(name):
    m = manifolds.get(name)
    g = _gen(11)
    for shape in [(6, 6), (8, 4), (4, 8), (2, 5, 5), (1, 4), (4, 1)]:
        if name == "birkhoff" and shape[-1] != shape[-2]:
            continue
        for dtype in DTYPES:
            if name == "dgram" and dtype in HALF:
                continue  # W·Λ is not exact in half precision
            W = m.random(shape, generator=g, dtype=dtype)
            N = _exactly_normal(name, W, g)
            for G in (torch.zeros(shape, dtype=torch.float64), N * 2.0 ** -100, N, N * 2.0 ** 100):
                if not bool(torch.isfinite(G.to(dtype)).all()):
                    continue  # 2^100 is beyond fp16
                st = {}
                A = m.dualize(W, G.to(dtype), st)
                assert float(A.double().abs().max()) == 0.0, (shape, dtype)
                assert bool(torch.isfinite(A).all())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_gradients_and_points_raise_value_error(name, dtype):
    m = manifolds.get(name)
    W = m.random((4, 4), generator=_gen(2), dtype=dtype)
    for bad in (float("nan"), float("inf"), -float("inf")):
        G = torch.randn(4, 4, generator=_gen(3)).to(dtype)
        G[2, 1] = bad
        with pytest.raises(ValueError):
            m.dualize(W, G)
        with pytest.raises(ValueError):
            m.dualize(G, W)
        with pytest.raises(ValueError):
            m.step(W, G, 0.1)
        with pytest.raises(ValueError):
            m.retract(G)


def _certificate_check(name, W, G, dtype, gap_tol=8e-3):
    """Feasibility measured here and the reported certificate rechecked with an SVD."""
    man = Stiefel() if name == "stiefel" else DGram()
    st = {}
    A = man.dualize(W.to(dtype), G.to(dtype), st).double()
    Wt, Gt, At = _tall(W.to(dtype).double()), _tall(G.to(dtype).double()), _tall(A)
    n = Wt.size(-1)
    if name == "dgram":
        Wt = Wt / (Wt.norm(dim=(-2, -1), keepdim=True) / math.sqrt(n))
    Gn = Gt * (math.sqrt(n) / Gt.norm(dim=(-2, -1), keepdim=True))
    top = torch.linalg.matrix_norm(At, 2)
    C = Wt.mT @ At + At.mT @ Wt
    if name == "dgram":
        C = _off(C)
    tangency = C.abs().amax((-2, -1)) / Wt.norm(dim=-2).amax(-1) ** 2
    lam = st["certificate"].double()
    # symmetric to the float32 rounding of the preconditioned steps (test_dgram_certificate_is_exactly_symmetric)
    assert float((lam - lam.mT).abs().max()) <= 1e-4 * float(lam.abs().max()) + 1e-12
    if name == "dgram":  # a multiplier for Off(·) only bounds with a zero diagonal
        assert float(torch.diagonal(lam, dim1=-2, dim2=-1).abs().max()) == 0.0
    upper = torch.linalg.svdvals(Gn + 2 * Wt @ sym(lam)).sum(-1)
    score = (Gn * At).sum((-2, -1))
    return top, tangency, score / upper, st


def sym(X):
    return 0.5 * (X + X.mT)


@pytest.mark.parametrize("name", ["stiefel", "dgram"])
@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (2, 3), (3, 2), (5, 5), (40, 10), (10, 40), (2, 12, 6)], ids=str)
def test_stiefel_and_dgram_certificates_hold_on_adversarial_gradients(name, shape):
    g = _gen(13)
    W = Stiefel().random(shape, generator=g, dtype=torch.float64)
    if name == "dgram":  # column (row, when wide) norms spread over 1e4
        k = min(shape[-2:])
        s = torch.logspace(0, -4, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
        W = W * s if shape[-2] >= shape[-1] else s[:, None] * W
    for kind, G in _gradients(shape, g).items():
        for scale, dtype in ((1e-30, torch.float64), (1.0, torch.float64), (1e30, torch.float32), (1.0, torch.float32)):
            top, tangency, ratio, st = _certificate_check(name, W, G * scale, dtype)
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            assert bool(((top - 1).abs() <= tol).all()), (kind, scale, dtype, top)
            assert bool((tangency <= max(tol, 1e-9 if dtype == torch.float64 else 5e-6)).all()), (kind, tangency)
            # the certificate bounds every feasible point (A rounded to float32 has ‖A‖₂ = 1 ± 3e-8)
            assert bool((ratio <= 1 + tol).all()), (kind, scale, dtype, ratio)
            assert st["certified"] and bool((ratio >= 1 - 8e-3 - tol).all()), (kind, scale, dtype, ratio)
            assert abs(float((1 - ratio).max()) - float(st["duality_gap"])) <= 1e-6 + tol


# ----------------------------------------------------------------------------- 3. Birkhoff
def _marginal_error(W):
    Wd = W.double()
    return max(float((Wd.sum(-1) - 1).abs().max()), float((Wd.sum(-2) - 1).abs().max()))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 32])
def test_birkhoff_retract_is_doubly_stochastic_on_extreme_inputs(n):
    B = Birkhoff()
    g = _gen(n)
    logits = (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    inputs = {
        "pm1e4": logits,  # entries ≤ 0 raised to 1e-12·max
        "exp(±300)": torch.exp(logits * 0.03),
        "exp(logits ±1e4)": torch.exp(logits - logits.max()),  # one entry 1, the rest underflow to ~0
        "perm+1e-30": torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)] + 1e-30,
        "one entry": torch.zeros(n, n, dtype=torch.float64).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(1.0, dtype=torch.float64)),
        "rank1": torch.rand(n, 1, generator=g, dtype=torch.float64) @ torch.rand(1, n, generator=g, dtype=torch.float64),
    }
    for kind, Y in inputs.items():
        for dtype in DTYPES:
            Yc = Y.to(dtype)
            if not bool(torch.isfinite(Yc).all()) or not bool((Yc != 0).any()):
                continue
            W = B.retract(Yc)
            assert W.dtype == dtype and bool((W >= 0).all())
            assert _marginal_error(W) <= containment_tol(W, None), (kind, dtype, _marginal_error(W))
            assert B.contains(W)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_birkhoff_dualize_is_tangent_with_unit_norm_and_ascends(n):
    B = Birkhoff()
    g = _gen(20 + n)
    P = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    points = {"random": B.random((n, n), generator=g, dtype=torch.float64),
              "near vertex 1e-12": (1 - (n - 1) * 1e-12) * P + 1e-12 * (1 - P) if n > 1 else P,
              "uniform": torch.full((n, n), 1.0 / n, dtype=torch.float64)}
    for W in points.values():
        for G in (torch.randn(n, n, generator=g, dtype=torch.float64),
                  (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * 1e4,
                  torch.randn(n, n, generator=g, dtype=torch.float64) * 1e30,
                  torch.randn(n, n, generator=g, dtype=torch.float64) * 1e-30):
            for dtype in DTYPES:
                Gc = G.to(dtype)
                if not bool(torch.isfinite(Gc).all()) or not bool((Gc != 0).any()):
                    continue  # beyond fp16's range
                A = B.dualize(W.to(dtype), Gc).double()
                eps = torch.finfo(dtype).eps
                assert max(float(A.sum(-1).abs().max()), float(A.sum(-2).abs().max())) <= 8 * eps * n
                if n == 1:
                    assert float(A.abs().max()) == 0.0
                    continue
                assert abs(float(B.norm(A)) - 1) <= 2 * eps * n
                assert float((A * Gc.double()).sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_birkhoff_step_with_negative_or_huge_lr_stays_on_the_polytope(dtype):
    """lr < 0 gave a negative trust-region scale: the point left the polytope (marginals off by up to
    0.36)."""
    B = Birkhoff()
    g = _gen(31)
    for n in (2, 4, 8):
        P = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        for W0 in (B.random((n, n), generator=g, dtype=torch.float64), (1 - (n - 1) * 1e-12) * P + 1e-12 * (1 - P)):
            W = W0.to(dtype)
            A = B.dualize(W, torch.randn(n, n, generator=g).to(dtype))
            for lr in (-1e-3, -0.1, -1.0, -1e20, 1e20):
                W2 = B.step(W, A, lr)
                assert B.contains(W2) and bool((W2 >= 0).all()), (n, lr)
                moved = float((W2.double() - W.double()).abs().sum(-1).max().maximum((W2.double() - W.double()).abs().sum(-2).max()))
                assert moved <= abs(lr) * float(B.norm(A)) + 4 * n * torch.finfo(dtype).eps, (n, lr, moved)


def test_birkhoff_ascent_step_increases_the_linear_objective():
    B = Birkhoff()
    g = _gen(32)
    W = B.random((4, 4), generator=g, dtype=torch.float64)
    G = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = B.dualize(W, G)
    assert float((B.step(W, A, 0.05) * G).sum()) < float((W * G).sum()) < float((B.step(W, A, -0.05) * G).sum())


# ----------------------------------------------------------------------------- 4. constants
def test_containment_tolerances_are_the_stated_constants():
    assert CONTAINS_TOL == 1e-4
    assert containment_tol(torch.zeros(1), None) == 1e-4
    assert containment_tol(torch.zeros(1, dtype=torch.float64), None) == 1e-4
    assert math.isclose(containment_tol(torch.zeros(1, dtype=torch.bfloat16), None), 9.765625e-3)  # "9.8e-3"
    assert math.isclose(containment_tol(torch.zeros(1, dtype=torch.float16), None), 1.220703125e-3)  # "1.2e-3"
    assert containment_tol(torch.zeros(1, dtype=torch.bfloat16), 0.5) == 0.5


@pytest.mark.parametrize("name", ["stiefel", "dgram", "oblique", "sphere"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_rounding_stays_within_half_the_stated_tolerance(name, dtype):
    """The docstring's bound (a Gram entry of unit columns, a norm or a row sum moves by ≤ 2u = eps under
    rounding) measured on large random points: the error is below half of HALF_TOL_EPS·eps."""
    m = manifolds.get(name)
    for shape in [(1024, 128), (256, 256), (128, 1024)]:
        W = m.random(shape, generator=_gen(1), dtype=dtype)
        Wt = _tall(W.double())
        if name == "stiefel":
            err = (Wt.mT @ Wt - torch.eye(Wt.size(-1), dtype=torch.float64)).abs().max()
        elif name == "dgram":
            u = Wt / Wt.norm(dim=0)
            err = _off(u.mT @ u).abs().max()
        elif name == "oblique":
            err = (Wt.norm(dim=0) - 1).abs().max()
        else:
            err = (W.double().norm() - 1).abs()
        assert float(err) <= 0.5 * containment_tol(W, None), (shape, float(err))
        assert m.contains(W)
    n = 32
    B = Birkhoff().random((n, n), generator=_gen(2), dtype=dtype)
    assert _marginal_error(B) <= 0.5 * containment_tol(B, None)


# ----------------------------------------------------------------------------- 5. state
@pytest.mark.parametrize("name", ["stiefel", "dgram"])
def test_warm_state_survives_shape_dtype_and_batch_changes(name):
    m = manifolds.get(name)
    g = _gen(40)
    W, G = m.random((24, 8), generator=g), torch.randn(24, 8, generator=g)
    st = {}
    m.dualize(W, G, st)
    assert st["certified"] and not st["warm_start"]
    cases = [
        (m.random((24, 6), generator=g), torch.randn(24, 6, generator=g), False),  # other n: cold
        (W.double(), G.double(), True),                                           # other dtype: warm
        (W.bfloat16(), G.bfloat16(), True),
        (W.mT.contiguous(), G.mT.contiguous(), True),                              # same Gram size
        (m.random((3, 24, 8), generator=g), torch.randn(3, 24, 8, generator=g), False),  # now a batch: cold
    ]
    for Wc, Gc, warm in cases:
        s = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        A = m.dualize(Wc, Gc, s)
        assert bool(torch.isfinite(A).all()) and s["certified"], (tuple(Wc.shape), Wc.dtype)
        assert s["warm_start"] == warm, (tuple(Wc.shape), Wc.dtype)
        assert s["certificate"].dtype == Wc.dtype
    # batch → single, and empty state
    sb = {}
    m.dualize(cases[-1][0], cases[-1][1], sb)
    m.dualize(W, G, sb)
    assert sb["certified"] and tuple(sb["certificate"].shape) == (8, 8)
    for empty in ({}, None):
        assert bool(torch.isfinite(m.dualize(W, G, empty)).all())


@pytest.mark.parametrize("name", ["stiefel", "dgram"])
def test_stacked_states_of_mixed_dtype_shape_or_none(name):
    m = manifolds.get(name)
    g = _gen(41)
    W, G = m.random((3, 16, 4), generator=g), torch.randn(3, 16, 4, generator=g)
    states = [{}, {}, {}]
    m._dualize_stack(W, G, states)
    states[1] = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in states[1].items()}
    A = m._dualize_stack(W, G, [states[0], states[1], None])
    assert bool(torch.isfinite(A).all()) and states[0]["warm_start"] and states[1]["warm_start"]
    W6, G6 = m.random((3, 16, 6), generator=g), torch.randn(3, 16, 6, generator=g)
    m._dualize_stack(W6, G6, states)
    assert [s["warm_start"] for s in states] == [False, False, False]


@pytest.mark.parametrize("name", ["euclidean", "oblique", "sphere", "birkhoff"])
def test_stateless_manifolds_write_only_their_diagnostics(name):
    m = manifolds.get(name)
    W = m.random((4, 4), generator=_gen(42))
    st = {"certificate": torch.full((9, 9), float("nan")), "junk": 1}
    m.dualize(W, torch.randn(4, 4, generator=_gen(43)), st)
    assert st["iterations"] == 0 and st["tangent_residual"] <= 1e-6 and st["junk"] == 1


# ----------------------------------------------------------------------------- documented defects
def test_dgram_point_with_a_zero_column_is_refused_or_dualized():
    """A point with a zero column: DGram.contains refuses it (as retract does), and dualize there
    raises a ValueError, not torch's LinAlgError from Cholesky."""
    W = Stiefel().random((16, 4), generator=_gen(50), dtype=torch.float64)
    W[:, 0] = 0.0
    D = DGram()
    if D.contains(W):
        try:
            A = D.dualize(W, torch.randn(16, 4, generator=_gen(51), dtype=torch.float64))
        except ValueError:
            return
        assert bool(torch.isfinite(A).all())


def test_bf16_reported_gap_is_the_gap_of_the_returned_direction():
    """For a bf16 gradient the caller gets A rounded to bf16; the reported gap is that of the rounded
    A (it was the float32 A's: up to 2e-3 smaller, and a 12×12 DGram solve reported certified=True at
    a true gap of 8.2e-3 > gap_tol)."""
    worst = 0.0
    for name in ("stiefel", "dgram"):
        for m, n in ((16, 8), (12, 12)):
            for seed in range(4):
                g = _gen(seed)
                W = Stiefel().random((m, n), generator=g, dtype=torch.float64)
                G = torch.randn(m, n, generator=g, dtype=torch.float64)
                _, _, ratio, st = _certificate_check(name, W, G, torch.bfloat16)
                worst = max(worst, float(1 - ratio) - float(st["duality_gap"]))
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("name", ["stiefel", "dgram"])
def test_non_finite_warm_start_falls_back_to_a_cold_start(name):
    """A non-finite warm-start certificate in state (a corrupt or foreign checkpoint) falls back to the
    cold start Λ₀ for that member (it crashed eigvalsh before)."""
    m = manifolds.get(name)
    W, G = m.random((24, 8), generator=_gen(60)), torch.randn(24, 8, generator=_gen(61))
    st = {}
    m.dualize(W, G, st)
    st["certificate"] = torch.full_like(st["certificate"], float("nan"))
    A = m.dualize(W, G, st)
    assert bool(torch.isfinite(A).all()) and st["certified"]


def test_an_absurd_warm_smoothing_does_not_end_the_solve_uncertified():
    """A warm smoothing μ with μ² above ‖M₀‖_F² (here 1e30) is dropped: kept, it cancelled the upper
    bound Σ√(eig(F + μ²I) − μ²) to ~0 and the solve ended uncertified at a 26% gap."""
    m = DGram()
    W, G = m.random((24, 8), generator=_gen(0)), torch.randn(24, 8, generator=_gen(1))
    st = {}
    m.dualize(W, G, st)
    st["dual_smoothing"] = torch.full_like(st["dual_smoothing"], 1e30)
    m.dualize(W, G, st)
    assert st["certified"], float(st["duality_gap"])


def test_stiefel_step_never_raises_on_the_optimizer_path_within_its_stated_domain():
    """docs/manifolds.md: on the optimizer's path (W − lr·A, A tangent) Stiefel's step never raises
    for lr·‖A‖₂ < 1e7; beyond, a square W whose A is rank-deficient (odd n: A = W·msign(skew) has rank
    n − 1) gives the retraction's clear ValueError, not a wrong point."""
    S = Stiefel()
    W = S.random((5, 5), generator=_gen(70), dtype=torch.float64)
    A = S.dualize(W, torch.randn(5, 5, generator=_gen(71), dtype=torch.float64))
    for lr in (1.0, 1e3, 1e6):
        assert S.contains(S.step(W, A, lr))
    with pytest.raises(ValueError, match="rank"):
        S.step(W, A, 1e8)


def test_dgram_certificate_is_exactly_symmetric():
    """DGram's certificate Λ is exactly symmetric (Λ = P(Λ)): the float32 preconditioner left a skew
    part of ~4e-5 relative, which adds ⟨skew Λ, WᵀA⟩ to the bound."""
    worst = 0.0
    for shape in [(40, 10), (10, 40), (2, 12, 6)]:
        g = _gen(13)
        W = Stiefel().random(shape, generator=g, dtype=torch.float64)
        k = min(shape[-2:])
        s = torch.logspace(0, -4, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
        W = W * s if shape[-2] >= shape[-1] else s[:, None] * W
        for G in _gradients(shape, g).values():
            st = {}
            DGram().dualize(W, G, st)
            lam = st["certificate"]
            worst = max(worst, float((lam - lam.mT).abs().max() / lam.abs().max()))
    assert worst <= 1e-9, worst
