"""Closed-form steepest tangent direction for square Stiefel matrices (the orthogonal group).

For square invertible W the tangent space {A : WᵀA + AᵀW = 0} is {W⁻ᵀK : K skew}, and
⟨G, W⁻ᵀK⟩ = ⟨W⁻¹G, K⟩ = ⟨S, K⟩ with S = skew(Γ⁻¹WᵀG), Γ = WᵀW. Taking K = msign(S):

    lower bound  ⟨G, A⟩/‖A‖₂ ≥ ‖S‖_*·σ_min(W)      (A = W⁻ᵀK, ‖A‖₂ ≤ 1/σ_min(W))
    upper bound  ‖G + 2WΛ‖_* = ‖W·S‖_* ≤ σ_max(W)·‖S‖_*   for Λ = −sym(Γ⁻¹WᵀG)/2,

so the answer is certified within 1 − σ_min/σ_max of the optimum whatever G is: exact on the
manifold, ~1e-5 for points retracted in float32. One n×n eigendecomposition and ~8 n×n products;
the general Gram-space solver (``dual_ascent``) took about twice that for the same answer
(its set-up, one iteration and the final bound). A point too far from orthogonal for the
certificate is left to that solver.
"""
from __future__ import annotations

import math

import torch

from .base import fro, sym
from .dual_ascent import _inv_sqrt_values, scaled_gradient
from .dual_record import _no_tangent, _record, delivered_score, worst_member
from .gram_ops import inverse_gram

#: the largest certificate 1 − σ_min/σ_max taken from Gershgorin's discs; float32 points on the
#: manifold have ~1e-5 (n = 128), and a looser one costs an eigvalsh of Γ (1 ms at n = 128)
GERSHGORIN_SLACK = 1e-4


def _within(low: torch.Tensor, high: torch.Tensor, gap: float) -> bool:
    """Whether every member's certificate 1 − √(λ_min/λ_max) of Γ is ≤ gap (λ_min > 0)."""
    return bool(((low > 0) & (1.0 - (low.clamp_min(0) / high).sqrt() <= gap)).all())


def _gershgorin(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds on the eigenvalues of the symmetric Γ per matrix (Gershgorin discs):
    rigorous, and tight (~n·1e-7) at points retracted onto Stiefel in float32."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    radius = gram.abs().sum(-1) - d.abs()
    return (d - radius).amin(-1), (d + radius).amax(-1)


def orthogonal_dualize(W: torch.Tensor, G: torch.Tensor, state: dict | None, gap_tol: float,
                       state_dtype: torch.dtype | None = None, per_member: bool = False,
                       answer_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """argmax ⟨G, A⟩ over ‖A‖₂ ≤ 1, WᵀA + AᵀW = 0 for square W (..., n, n): A ∝ W⁻ᵀ·msign(skew(W⁻¹G)),
    certified by the bounds of the module docstring; None when a member's certificate exceeds
    ``gap_tol`` (W far from orthogonal), for the caller to solve iteratively. ``state`` receives the
    same entries as ``dual_ascent.steepest_tangent`` (1 iteration, never a warm start; the batch's
    worst member unless ``per_member``; the gap that of the answer rounded to ``answer_dtype``)."""
    n, dt = W.size(-1), W.dtype
    kept = dt if state_dtype is None else state_dtype
    sdt = torch.float64  # as the general solver: a small tangent part under a large normal one
    W, G = W.to(sdt), G.to(sdt)
    gram = sym(W.mT @ W)
    # the certificate 1 − σ_min/σ_max, decided before any work on G: Gershgorin's bounds on Γ's
    # eigenvalues, or the eigenvalues themselves where those are loose (points off the manifold,
    # bf16 storage), so that the reported gap stays within GERSHGORIN_SLACK of the true one
    low, high = _gershgorin(gram)
    if not _within(low, high, GERSHGORIN_SLACK):
        eig = torch.linalg.eigvalsh(gram)
        low, high = eig[..., 0], eig[..., -1]
        if not _within(low, high, gap_tol):
            return None
    Gn = scaled_gradient(G)
    gram_inv = inverse_gram(gram)
    C = gram_inv @ (W.mT @ Gn)                       # W⁻¹Ĝ
    S = 0.5 * (C - C.mT)
    has_tangent = fro(S)[..., 0, 0] > 1e-6 * math.sqrt(n)
    if not bool(has_tangent.any()):
        A = _no_tangent(W, state, dt, kept)
        if state is not None and not per_member:
            worst_member(state)
        return A
    e, V = torch.linalg.eigh(S.mT @ S)
    nuclear = e.clamp_min(0).sqrt().sum(-1)          # ‖S‖_*
    K = S @ ((V * _inv_sqrt_values(e).unsqueeze(-2)) @ V.mT)
    K = 0.5 * (K - K.mT)                             # msign(S), skew to rounding
    B = gram_inv @ K                                 # A = W·Γ⁻¹K = W⁻ᵀK: WᵀA = K exactly skew
    top = torch.linalg.eigvalsh(sym(K.mT @ B))[..., -1].clamp_min(0).sqrt()   # ‖A‖₂² = λ_max(KᵀΓ⁻¹K)
    top = torch.where(has_tangent, top, torch.ones_like(top)).clamp_min(1e-300)[..., None, None]
    A = torch.where(has_tangent[..., None, None], W @ (B / top), torch.zeros_like(W))
    out = A.to(dt)
    if state is not None:  # the gap of what the caller gets, against the certified upper bound
        hi = high.sqrt() * nuclear
        exact = torch.where(has_tangent, delivered_score(Gn, out, answer_dtype), torch.zeros_like(hi))
        gap = torch.where(has_tangent, (hi - exact) / hi.clamp_min(1e-300), torch.zeros_like(hi))
        WtA = gram @ (B / top)
        # a member without tangent part takes no iteration, as alone (``_no_tangent``)
        _record(state, kept, gap, gap_tol, has_tangent.long(), False, step=torch.full_like(top, 0.1),
                smoothing=None, certificate=-sym(C) / 2, residual=torch.linalg.vector_norm(WtA + WtA.mT, dim=(-2, -1)) / n)
        if not per_member:
            worst_member(state)
    return out
