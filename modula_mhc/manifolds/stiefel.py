"""Stiefel manifold {W : WᵀW = I} (tall; orthonormal rows when wide), spectral norm."""
from __future__ import annotations

import torch

from .base import as_tall, check_tensor, compute_dtype, containment_tol, from_tall, is_wide, polar, spectral_norm
from .gram import GramManifold
from .orthogonal import orthogonal_dualize


class Stiefel(GramManifold):
    """Stiefel(gap_tol=8e-3, max_iters=1000).

    Tangent space at W: {A : WᵀA + AᵀW = 0}; natural norm ‖A‖₂.
    dualize: argmax ⟨G, A⟩ over ‖A‖₂ ≤ 1 in the tangent space, certified to within ``gap_tol`` of
    the optimum by a dual bound (square W: closed form A ∝ W⁻ᵀ·msign(skew(W⁻¹G)), certified within
    1 − σ_min(W)/σ_max(W), ``manifolds/orthogonal.py``; the iterative solver when that exceeds gap_tol).
    retract(Y) = polar factor of Y, exact (float64 Gram route); a rank-deficient Y raises ValueError.
    """

    name = "stiefel"
    offdiag = False

    def _tangent(self, Wt, Gt, state, per_member, kept, answer):
        if Wt.size(-1) == Wt.size(-2):  # square: the closed form, unless W is far from orthogonal
            A = orthogonal_dualize(Wt, Gt, state, self.gap_tol, kept, per_member, answer)
            if A is not None:
                return A
        return super()._tangent(Wt, Gt, state, per_member, kept, answer)

    def retract(self, Y):
        wide = is_wide(Y)
        return from_tall(polar(as_tall(Y.to(compute_dtype(Y)), wide)), wide).to(Y.dtype)

    def contains(self, W, tol=None):
        check_tensor(W, "Stiefel.contains")
        tol = containment_tol(W, tol)
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        eye = torch.eye(Wt.size(-1), dtype=Wt.dtype, device=Wt.device)
        return bool(((Wt.mT @ Wt - eye).abs() <= tol).all())

    def diagnostics(self, W):
        W = W.detach()
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        eye = torch.eye(Wt.size(-1), dtype=Wt.dtype, device=Wt.device)
        return {"top_singular_value": float(spectral_norm(W).max()),
                "orthogonality_error": float((Wt.mT @ Wt - eye).abs().max())}
