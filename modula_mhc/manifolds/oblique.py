"""Oblique manifold: unit-norm columns (tall) or rows (wide); norm = max column ℓ2."""
from __future__ import annotations

import torch

from .base import (
    Manifold,
    as_tall,
    check_shape,
    check_tensor,
    compute_dtype,
    containment_tol,
    from_tall,
    is_wide,
    unit_columns,
    unit_max_scale,
)


class Oblique(Manifold):
    """Product of unit spheres, one per column of the tall orientation: diag(WᵀW) = 1.

    Tangent space: {A : w_jᵀ a_j = 0 for every column j}. Natural norm max_j ‖a_j‖₂.
    dualize: per column a_j = (I − w_j w_jᵀ) g_j / ‖(I − w_j w_jᵀ) g_j‖ (0 where that is 0), which
    maximises Σ_j ⟨g_j, a_j⟩ with every ‖a_j‖ ≤ 1. retract: normalise each column.
    step = retract((W − lr·A)/max(1, |lr|)): the same point (each column's scale is dropped), in fp32
    for half-precision weights and finite at any finite lr.
    """

    name = "oblique"
    retract_ignores_scale = True

    def dualize(self, W, G, state=None):
        dt, wide = compute_dtype(G), is_wide(W)
        Wt = as_tall(W.to(dt), wide)
        Gt, _ = unit_max_scale(as_tall(G.to(dt), wide))
        Wu, _ = unit_columns(Wt)
        T = Gt - Wu * (Wu * Gt).sum(dim=-2, keepdim=True)
        A, t_norm = unit_columns(T)
        # a column whose gradient is (numerically) normal to w has no tangent direction
        gn = torch.linalg.vector_norm(Gt, dim=-2)
        A = torch.where((t_norm > 1e-6 * gn).unsqueeze(-2), A, torch.zeros_like(A))
        if state is not None:
            state["iterations"] = 0
            state["tangent_residual"] = float((Wu * A).sum(dim=-2).abs().max()) if A.numel() else 0.0
        return from_tall(A, wide).to(G.dtype)

    def retract(self, Y):
        wide = is_wide(Y)
        Yt = as_tall(Y.to(compute_dtype(Y)), wide)
        W, n = unit_columns(Yt)
        if bool((n == 0).any()):
            raise ValueError("Oblique.retract: a column is exactly zero, it has no nearest unit vector")
        return from_tall(W, wide).to(Y.dtype)

    def contains(self, W, tol=None):
        check_tensor(W, "Oblique.contains")
        tol = containment_tol(W, tol)
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        return bool(((torch.linalg.vector_norm(Wt, dim=-2) - 1).abs() <= tol).all())

    def norm(self, A):
        check_tensor(A, "Oblique.norm")
        At = as_tall(A.to(compute_dtype(A)), is_wide(A))
        Au, amax = unit_max_scale(At)
        return (torch.linalg.vector_norm(Au, dim=-2) * amax[..., 0, :]).max()

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "Oblique.random")
        if len(shape) < 2:
            raise ValueError(f"Oblique.random: expected a matrix shape (..., out, in), got {shape}")
        Z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return self.retract(Z).to(dtype=dtype, device=device)

    def diagnostics(self, W):
        Wt = as_tall(W.detach().to(compute_dtype(W)), is_wide(W))
        return {"column_norm_error": float((torch.linalg.vector_norm(Wt, dim=-2) - 1).abs().max())}
