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
