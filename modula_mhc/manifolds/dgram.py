"""DGram manifold {W : Off(WᵀW) = 0}: orthogonal columns with free column norms (Yoshihara 2026).

Wide matrices use rows. Natural norm: spectral. Column norms are a scale freedom the optimizer may
grow; on attention weights that growth saturates the softmax, so column norms and the top singular
value are exposed in ``diagnostics`` and ``max_scale`` caps them in ``retract``.
"""
from __future__ import annotations

import math

import torch

from .base import (Manifold, as_tall, check_same_shape, check_shape, check_tensor, compute_dtype, from_tall,
                   is_wide, polar, semi_orthogonal, spectral_norm)
from .dual_ascent import steepest_tangent
from .stiefel import check_dual_settings


def off_diagonal(H: torch.Tensor) -> torch.Tensor:
    """Off(H): H with its diagonal set to zero."""
    return H - torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1))


def column_norms(Wt: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each column of a tall (..., m, n) matrix, shape (..., n)."""
    return torch.linalg.vector_norm(Wt, dim=-2)


class DGram(Manifold):
    """DGram(max_scale=None, tol=1e-5, max_iters=100, step=0.1, smoothing=0.03).

    Tangent space at W = Q·diag(s) (Q orthonormal columns): {A : Off(WᵀA + AᵀW) = 0}, i.e.
    s_i (QᵀA)_ij + s_j (QᵀA)_ji = 0 for i ≠ j. Natural norm ‖A‖₂.
    dualize: the Stiefel dual descent with the projector P = Off and the normal solve
    X_ij = H_ij / (s_i² + s_j²) (W is first divided by its RMS column norm: the constraint set is
    a cone, so only ratios of column norms matter), on the smoothed dual (``smoothing`` μ; the
    plain DGram dual is nonsmooth and crawls, see docs/manifolds.md).
    retract(Y) = msign(Y)·diag(‖y_j‖): column j of the polar factor times the norm of column j of
    Y (no sorting of singular values into columns), capped at ``max_scale`` when given. It is the
    identity on the manifold and first-order correct (see docs/manifolds.md).
    """

    name = "dgram"
    admits_scaling = True

    def __init__(self, max_scale: float | None = None, tol: float = 1e-5, max_iters: int = 100, step: float = 0.1,
                 smoothing: float = 0.03):
        check_dual_settings("DGram", tol, max_iters, step)
        if not (isinstance(smoothing, (int, float)) and smoothing >= 0):
            raise ValueError(f"DGram: smoothing must be a number >= 0, got {smoothing!r}")
        self.smoothing = float(smoothing)
        if max_scale is not None and not (isinstance(max_scale, (int, float)) and max_scale > 0):
            raise ValueError(f"DGram: max_scale must be None or a positive number, got {max_scale!r}")
        self.max_scale = None if max_scale is None else float(max_scale)
        self.tol, self.max_iters, self.step_size = float(tol), int(max_iters), float(step)

    def __repr__(self):
        return (f"DGram(max_scale={self.max_scale}, tol={self.tol}, max_iters={self.max_iters}, "
                f"step={self.step_size}, smoothing={self.smoothing})")

    def dualize(self, W, G, state=None):
        check_same_shape(W, G, "DGram.dualize")
        check_tensor(G, "DGram.dualize")
        dt, wide = compute_dtype(G), is_wide(W)
        Wt, Gt = as_tall(W.to(dt), wide), as_tall(G.to(dt), wide)
        n = Wt.size(-1)
        # only ratios of column norms matter: normalise to RMS column norm 1
        scale = torch.linalg.vector_norm(Wt, dim=(-2, -1), keepdim=True) / math.sqrt(n)
        Wn = Wt / scale.clamp_min(1e-30)
        sq = column_norms(Wn).square()
        denom = sq.unsqueeze(-1) + sq.unsqueeze(-2)

        def normal_solve(H):
            return torch.where(denom > 0, H / denom.clamp_min(1e-30), torch.zeros_like(H))

        A = steepest_tangent(Wn, Gt, off_diagonal, normal_solve, state, self.tol, self.max_iters, self.step_size,
                             self.smoothing)
        return from_tall(A, wide).to(G.dtype)

    def _scales(self, Yt):
        s = column_norms(Yt)
        return s if self.max_scale is None else s.clamp_max(self.max_scale)

    def retract(self, Y):
        check_tensor(Y, "DGram.retract")
        wide = is_wide(Y)
        Yt = as_tall(Y.to(compute_dtype(Y)), wide)
        Wt = polar(Yt) * self._scales(Yt).unsqueeze(-2)
        return from_tall(Wt, wide).to(Y.dtype)

    def contains(self, W, tol=1e-4):
        check_tensor(W, "DGram.contains")
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        s = column_norms(Wt)
        outer = (s.unsqueeze(-1) * s.unsqueeze(-2)).clamp_min(1e-30)
        ok = (off_diagonal(Wt.mT @ Wt).abs() / outer <= tol).all()
        if self.max_scale is not None:
            ok = ok & (s <= self.max_scale * (1 + tol)).all()
        return bool(ok)

    def norm(self, A):
        check_tensor(A, "DGram.norm")
        return spectral_norm(A).max()

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "DGram.random")
        if len(shape) < 2:
            raise ValueError(f"DGram.random: expected a matrix shape (..., out, in), got {shape}")
        return semi_orthogonal(shape, generator, dtype, device)

    def diagnostics(self, W):
        W = W.detach()
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        s = column_norms(Wt)
        smin, smax = float(s.min()), float(s.max())
        outer = (s.unsqueeze(-1) * s.unsqueeze(-2)).clamp_min(1e-30)
        return {"top_singular_value": float(spectral_norm(W).max()),
                "column_norm_max": smax, "column_norm_min": smin,
                "column_norm_spread": smax / smin if smin > 0 else math.inf,
                "off_diagonal_gram": float((off_diagonal(Wt.mT @ Wt).abs() / outer).max())}
