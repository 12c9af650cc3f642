"""Birkhoff polytope: doubly-stochastic n×n matrices with positive entries (mHC's residual mixing)."""
from __future__ import annotations

import torch

from ..kernels import sinkhorn
from .base import (Manifold, check_same_shape, check_shape, check_tensor, compute_dtype, unit_max_scale)

#: marginal tolerance of the Sinkhorn projections used by retract/step
SINKHORN_TOL = 1e-6


def _check_square(X, what):
    check_tensor(X, what)
    if X.size(-1) != X.size(-2):
        raise ValueError(f"{what}: Birkhoff matrices are square (..., n, n), got shape {tuple(X.shape)}")


def zero_marginals(G: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection onto {A : A1 = 0, 1ᵀA = 0}: G − r1ᵀ/n − 1cᵀ/n + (1ᵀG1)/n²·11ᵀ."""
    n = G.size(-1)
    rows = G.sum(dim=-1, keepdim=True)
    cols = G.sum(dim=-2, keepdim=True)
    total = G.sum(dim=(-2, -1), keepdim=True)
    return G - rows / n - cols / n + total / (n * n)


class Birkhoff(Manifold):
    """Doubly-stochastic matrices (rows and columns sum to 1, entries > 0), batched over leading dims.

    Tangent space: {A : A1 = 0, 1ᵀA = 0}. Natural norm: Frobenius ‖A‖_F (chosen because its dualize
    is exact: the projection of G onto the tangent space, normalised; ‖A‖₂ ≤ ‖A‖_F, so a unit
    step is also at most unit in the spectral and ℓ∞→ℓ∞/√n senses).
    retract(Y) = Sinkhorn–Knopp projection of Y (entries ≤ 0 are first raised to 1e-12·max|Y|).
    step(W, A, lr) = Sinkhorn(W ⊙ exp(−lr·A ⊘ W)) (Douik & Hassibi 2018): equal to W − lr·A to
    first order, but it keeps every entry positive whatever lr, so the optimizer uses it.
    """

    name = "birkhoff"

    def dualize(self, W, G, state=None):
        check_same_shape(W, G, "Birkhoff.dualize")
        _check_square(G, "Birkhoff.dualize")
        dt = compute_dtype(G)
        Gu, _ = unit_max_scale(G.to(dt))
        T = zero_marginals(Gu)
        tn = torch.linalg.vector_norm(T, dim=(-2, -1), keepdim=True)
        gn = torch.linalg.vector_norm(Gu, dim=(-2, -1), keepdim=True)
        A = torch.where(tn > 1e-6 * gn, T / tn.clamp_min(1e-30), torch.zeros_like(T))
        if state is not None:
            state["iterations"] = 0
            state["tangent_residual"] = float(max(A.sum(dim=-1).abs().max(), A.sum(dim=-2).abs().max())) \
                if A.numel() else 0.0
        return A.to(G.dtype)

    def retract(self, Y):
        _check_square(Y, "Birkhoff.retract")
        dt = compute_dtype(Y)
        Yu, amax = unit_max_scale(Y.to(dt))
        if bool((amax == 0).any()):
            raise ValueError("Birkhoff.retract: the zero matrix has no doubly-stochastic scaling")
        logits = Yu.clamp_min(1e-12).log()
        return sinkhorn(logits, tol=SINKHORN_TOL).to(Y.dtype)

    def step(self, W, A, lr):
        check_same_shape(W, A, "Birkhoff.step")
        _check_square(W, "Birkhoff.step")
        dt = compute_dtype(W)
        Wd, Ad = W.to(dt), A.to(dt)
        if bool((Wd <= 0).any()):
            raise ValueError("Birkhoff.step: W must have strictly positive entries (retract it first)")
        # log of W ⊙ exp(−lr·A ⊘ W), handed to the log-domain Sinkhorn (no overflow for tiny entries)
        logits = Wd.log() - lr * Ad / Wd
        return sinkhorn(logits, tol=SINKHORN_TOL).to(W.dtype)

    def contains(self, W, tol=1e-4):
        _check_square(W, "Birkhoff.contains")
        Wd = W.to(compute_dtype(W))
        rows_ok = ((Wd.sum(dim=-1) - 1).abs() <= tol).all()
        cols_ok = ((Wd.sum(dim=-2) - 1).abs() <= tol).all()
        return bool(rows_ok & cols_ok & (Wd >= -tol).all() & torch.isfinite(Wd).all())

    def norm(self, A):
        check_tensor(A, "Birkhoff.norm")
        Au, amax = unit_max_scale(A.to(compute_dtype(A)))
        return (torch.linalg.vector_norm(Au, dim=(-2, -1)) * amax[..., 0, 0]).max()

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "Birkhoff.random")
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"Birkhoff.random: expected a square shape (..., n, n), got {shape}")
        logits = torch.randn(shape, generator=generator, dtype=torch.float64)
        return sinkhorn(logits, tol=1e-12, max_iters=10000).to(dtype=dtype, device=device)

    def diagnostics(self, W):
        Wd = W.detach().to(compute_dtype(W))
        err = torch.maximum((Wd.sum(dim=-1) - 1).abs().max(), (Wd.sum(dim=-2) - 1).abs().max())
        return {"marginal_error": float(err), "min_entry": float(Wd.min()),
                "diagonal_mean": float(torch.diagonal(Wd, dim1=-2, dim2=-1).mean())}
