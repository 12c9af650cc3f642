"""Stiefel manifold {W : WᵀW = I} (tall; orthonormal rows when wide), spectral norm."""
from __future__ import annotations

import torch

from .base import as_tall, check_tensor, compute_dtype, from_tall, is_wide, polar, spectral_norm
from .gram import GramManifold


class Stiefel(GramManifold):
    """Stiefel(gap_tol=8e-3, max_iters=1000).

    Tangent space at W: {A : WᵀA + AᵀW = 0}; natural norm ‖A‖₂.
    dualize: argmax ⟨G, A⟩ over ‖A‖₂ ≤ 1 in the tangent space, certified to within ``gap_tol`` of
    the optimum by a dual bound (square W: exact, A = W·msign(skew(WᵀG))).
    retract(Y) = polar factor of Y, exact (float64 Gram route); a rank-deficient Y raises ValueError.
    """

    name = "stiefel"
    offdiag = False

    def retract(self, Y):
        wide = is_wide(Y)
        return from_tall(polar(as_tall(Y.to(compute_dtype(Y)), wide)), wide).to(Y.dtype)

    def contains(self, W, tol=1e-4):
        check_tensor(W, "Stiefel.contains")
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        eye = torch.eye(Wt.size(-1), dtype=Wt.dtype, device=Wt.device)
        return bool(((Wt.mT @ Wt - eye).abs() <= tol).all())

    def diagnostics(self, W):
        W = W.detach()
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        eye = torch.eye(Wt.size(-1), dtype=Wt.dtype, device=Wt.device)
        return {"top_singular_value": float(spectral_norm(W).max()),
                "orthogonality_error": float((Wt.mT @ Wt - eye).abs().max())}
