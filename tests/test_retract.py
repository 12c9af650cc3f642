"""Retractions are the identity on their manifold and exact (or refuse) off it (issue 12)."""
import math

import pytest
import torch

from modula_mhc.kernels import gram_polar, msign
from modula_mhc.manifolds import DGram, Stiefel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (32, 32)])
def test_dgram_retract_is_identity_on_dgram_per_column(dtype, spread, shape):
    g = torch.Generator().manual_seed(int(math.log10(spread)) + shape[0])
    k = min(shape)
    s = torch.logspace(0, -math.log10(spread), k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    Q = Stiefel().random(shape, generator=g, dtype=torch.float64)
    W = (Q * s if shape[0] >= shape[1] else s[:, None] * Q).to(dtype)
    R = DGram().retract(W)
    dim = 0 if shape[0] >= shape[1] else 1
    rel = ((R - W).double().norm(dim=dim) / W.double().norm(dim=dim)).max().item()
    assert rel <= 1e-5, rel          # the old msign(Y)·diag(‖y_j‖) lost 12–87% of the small columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_stiefel_retract_is_exact_on_ill_conditioned_input(dtype, cond):
    g = torch.Generator().manual_seed(1)
    U = Stiefel().random((80, 40), generator=g, dtype=torch.float64)
    V = Stiefel().random((40, 40), generator=g, dtype=torch.float64)
    Y = (U @ torch.diag(torch.logspace(0, -math.log10(cond), 40, dtype=torch.float64)) @ V.T).to(dtype)
    Q = Stiefel().retract(Y).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert (Q.T @ Q - torch.eye(40, dtype=torch.float64)).abs().max() <= tol
    if dtype == torch.float64 or cond <= 1e4:  # (float32 rounding of a cond-1e6 input moves its polar factor)
        assert (Q - (U @ V.T)).abs().max() <= 1e-4   # the polar factor itself, not some orthogonal matrix


def test_stiefel_retract_refuses_rank_deficient_input():
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(40, 3, generator=g) @ torch.randn(3, 20, generator=g)
    with pytest.raises(ValueError, match="rank-deficient"):
        Stiefel().retract(Y)
    with pytest.raises(ValueError, match="zero column"):
        DGram().retract(torch.zeros(8, 4))


def test_gram_polar_matches_polar_express_and_maps_zero_to_zero():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 48, 24, generator=g)
    assert torch.allclose(gram_polar(X), msign(X), atol=2e-3)
    assert torch.allclose(gram_polar(X, refine=False), gram_polar(X), atol=1e-5)
    assert torch.equal(gram_polar(torch.zeros(6, 3)), torch.zeros(6, 3))
    Xw = X.mT.contiguous()
    assert torch.allclose(gram_polar(Xw), gram_polar(X).mT, atol=1e-6)


@pytest.mark.parametrize("dtype,scales", [(torch.float32, (1e-22, 1e-21, 1e19)), (torch.float64, (1e-150, 1e-35, 1e155))])
def test_column_manifolds_retract_at_extreme_scales(dtype, scales):
    """Oblique and DGram normalise columns without squaring raw entries: before, a 1e-35 float64
    column came back at norm 3e-5 (a clamp at 1e-30), 1e19 float32 input gave NaN (DGram) or zeros
    (Oblique), and DGram refused 1e-23 float32 columns as zero."""
    from modula_mhc.manifolds import Oblique
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(12, 5, generator=g, dtype=torch.float64)
    for s in scales:
        Ys = (Y * s).to(dtype)
        O = Oblique().retract(Ys)
        assert Oblique().contains(O), s
        D = DGram().retract(Ys)
        assert torch.isfinite(D).all() and DGram().contains(D), s
        norms = torch.linalg.vector_norm(D.double() / s, dim=0)  # DGram keeps the column norms
        assert torch.allclose(norms, torch.linalg.vector_norm(Ys.double() / s, dim=0), rtol=1e-5)


def test_dgram_point_with_huge_columns_is_recognised_and_dualized():
    """A float32 DGram point with 1e20 column norms (representable): contains, retract and dualize
    all work (before: contains False, NaN retract, LinAlgError in dualize)."""
    g = torch.Generator().manual_seed(1)
    W = (Stiefel().random((12, 5), generator=g, dtype=torch.float64) * 1e20).float()
    assert DGram().contains(W)
    assert torch.isfinite(DGram().retract(W)).all()
    st = {}
    A = DGram().dualize(W, torch.randn(12, 5, generator=g), st)
    assert torch.isfinite(A).all() and st["certified"]
    assert float(torch.linalg.matrix_norm(A.double(), 2)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["stiefel", "dgram", "oblique", "sphere", "birkhoff"])
def test_half_precision_points_stay_on_their_manifold(name, dtype):
    """A point stored in bf16/fp16 is on its manifold only to the rounding of its entries:
    ``contains``'s default tolerance is that rounding (1.25·eps), so a fresh point and ten optimizer
    steps read as contained (at 1e-4 even ``random`` was refused), and a point off by a few times the
    rounding is still refused."""
    from modula_mhc.manifolds import Birkhoff, Oblique, Sphere
    M = {"stiefel": Stiefel(), "dgram": DGram(), "oblique": Oblique(), "sphere": Sphere(),
         "birkhoff": Birkhoff()}[name]
    shape = (4, 4) if name == "birkhoff" else (64, 32)
    g = torch.Generator().manual_seed(3)
    W = M.random(shape, generator=g, dtype=dtype)
    assert M.contains(W)
    for _ in range(10):
        W = M.step(W, M.dualize(W, torch.randn(shape, generator=g).to(dtype)), 0.05)
        assert W.dtype == dtype and M.contains(W)
    off = W.float()
    if name == "birkhoff":
        off[0] = off[0] * 1.05                      # row sum 1.05
    elif name == "dgram":
        c, s = math.cos(0.05), math.sin(0.05)       # two columns 0.05 rad off orthogonal
        off[:, 1] = c * off[:, 1] + s * off[:, 0] * (off[:, 1].norm() / off[:, 0].norm())
    elif name == "sphere":
        off = off * 1.05                            # the norm 5% long
    else:
        off[:, 0] = off[:, 0] * 1.05                # a column 5% long
    assert not M.contains(off.to(dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_optimizer_step_retracts_by_newton_schulz_to_the_polar_factor(dtype, tol, shape, monkeypatch):
    """W − lr·A from a Stiefel point is near-orthogonal up to scale: its retraction takes Newton–Schulz
    steps, no eigendecomposition (``kernels.gram_polar.NEAR_ORTHOGONAL``), and still returns the
    polar factor (float64 SVD) to rounding, for a steepest direction and a rank-1 tangent one, at
    small and very large lr; an input far from orthogonal (condition 10) takes the eigh route."""
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    W = Stiefel().random(shape, generator=g, dtype=dtype)
    k = min(shape)
    a, b = torch.randn(k, 1, generator=g, dtype=dtype), torch.randn(k, 1, generator=g, dtype=dtype)
    K = a @ b.T - b @ a.T  # skew, rank 2: W·K (tall) or K·W (wide) is tangent with two nonzero singular values
    low_rank = W @ K if shape[0] >= shape[1] else K @ W
    directions = [Stiefel().dualize(W, torch.randn(shape, generator=g, dtype=dtype)), low_rank / low_rank.norm()]
    far = W * torch.logspace(0, -1, k, dtype=dtype) if shape[0] >= shape[1] else torch.logspace(0, -1, k, dtype=dtype)[:, None] * W
    eigh = torch.linalg.eigh
    calls = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    steepest, low = directions
    cases = [(W - lr * steepest, True) for lr in (0.05, 0.5, 20.0)] + [(W - lr * low, True) for lr in (0.05, 0.5)]
    for Y, near in cases + [(W - 20.0 * low, False), (far, False)]:  # two singular values 1 + 200: far
        U, _, Vh = torch.linalg.svd(Y.double(), full_matrices=False)
        calls.clear()
        Q = Stiefel().retract(Y)
        assert (Q.double() - U @ Vh).abs().max() <= tol
        assert bool(calls) != near, len(calls)
