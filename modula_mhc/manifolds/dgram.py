"""DGram manifold {W : Off(WᵀW) = 0}: orthogonal columns with free column norms (Yoshihara 2026).

Wide matrices use rows. Natural norm: spectral. Column norms are a scale freedom the optimizer may
grow; on attention weights that growth saturates the softmax, so column norms and the top singular
value are exposed in ``diagnostics`` and ``max_scale`` caps them in ``retract``.
"""
from __future__ import annotations

import math

import torch

from .base import (
    as_tall,
    check_tensor,
    compute_dtype,
    containment_tol,
    from_tall,
    is_wide,
    polar,
    spectral_norm,
    unit_columns,
    unit_max_scale,
)
from .dual_ascent import off_diagonal
from .gram import GAP_TOL, MAX_ITERS, GramManifold


class DGram(GramManifold):
    """DGram(max_scale=None, gap_tol=8e-3, max_iters=1000).

    Tangent space at W = Q·diag(s) (Q orthonormal columns): {A : Off(WᵀA + AᵀW) = 0}, i.e.
    s_i (QᵀA)_ij + s_j (QᵀA)_ji = 0 for i ≠ j. Natural norm ‖A‖₂.
    dualize: the Gram-space dual solver with P = Off (W first divided by its RMS column norm: the
    constraint set is a cone, so only ratios of column norms matter), certified within ``gap_tol``.
    retract(Y) = polar(Y·diag(1/‖y_j‖))·diag(‖y_j‖): columns normalised before the polar factor, so
    it is the identity on DGram whatever the spread of column norms (no sorting of singular values
    into columns), first-order correct, and capped at ``max_scale`` when given.
    """

    name = "dgram"
    admits_scaling = True
    offdiag = True

    def __init__(self, max_scale: float | None = None, gap_tol: float = GAP_TOL, max_iters: int = MAX_ITERS):
        super().__init__(gap_tol, max_iters)
        if max_scale is not None and not (isinstance(max_scale, (int, float)) and 0 < max_scale < math.inf):
            raise ValueError(f"DGram: max_scale must be None or a positive number, got {max_scale!r}")
        self.max_scale = None if max_scale is None else float(max_scale)

    def _settings(self):
        return f"max_scale={self.max_scale}, " + super()._settings()

    def _normalise(self, Wt):
        Wu, _ = unit_max_scale(Wt)  # no overflow of the norm for 1e20 columns in float32
        scale = torch.linalg.vector_norm(Wu, dim=(-2, -1), keepdim=True) / math.sqrt(Wt.size(-1))
        return Wu / scale.clamp_min(1e-30)

    def retract(self, Y):
        wide = is_wide(Y)
        Yt = as_tall(Y.to(compute_dtype(Y)), wide)
        unit, s = unit_columns(Yt)
        if bool((s == 0).any()):
            raise ValueError("DGram.retract: a zero column has no direction; cannot retract onto DGram")
        Q = polar(unit)
        scales = s if self.max_scale is None else s.clamp_max(self.max_scale)
        return from_tall(Q * scales.unsqueeze(-2), wide).to(Y.dtype)

    def contains(self, W, tol=None):
        check_tensor(W, "DGram.contains")
        tol = containment_tol(W, tol)
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        unit, s = unit_columns(Wt)  # the cosines between columns, computed without overflow
        # W = Q·diag(s) with s > 0: a zero column has no direction (retract refuses it, dualize cannot start)
        ok = (off_diagonal(unit.mT @ unit).abs() <= tol).all() & (s > 0).all()
        if self.max_scale is not None:
            ok = ok & (s <= self.max_scale * (1 + tol)).all()
        return bool(ok)

    def diagnostics(self, W):
        W = W.detach()
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        unit, s = unit_columns(Wt)
        smin, smax = float(s.min()), float(s.max())
        return {"top_singular_value": float(spectral_norm(W).max()),
                "column_norm_max": smax, "column_norm_min": smin,
                "column_norm_spread": smax / smin if smin > 0 else math.inf,
                "off_diagonal_gram": float(off_diagonal(unit.mT @ unit).abs().max())}
