"""Stiefel manifold {W : WᵀW = I} (tall; orthonormal rows when wide), spectral norm."""
from __future__ import annotations

import torch

from .base import (Manifold, as_tall, check_same_shape, check_shape, check_tensor, compute_dtype, from_tall,
                   is_wide, polar, semi_orthogonal, spectral_norm)
from .dual_ascent import steepest_tangent


def check_dual_settings(owner: str, tol, max_iters, step):
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{owner}: tol must be a positive number, got {tol!r}")
    if not (isinstance(max_iters, int) and max_iters >= 1):
        raise ValueError(f"{owner}: max_iters must be an int >= 1, got {max_iters!r}")
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"{owner}: step must be a positive number, got {step!r}")


class Stiefel(Manifold):
    """Stiefel(tol=1e-5, max_iters=100, step=0.1, smoothing=0.0).

    Tangent space at W: {A : WᵀA + AᵀW = 0}; natural norm ‖A‖₂.
    dualize: argmax ⟨G, A⟩ over ‖A‖₂ ≤ 1 in the tangent space, by accelerated dual descent on
    Λ (A = msign(G + 2WΛ)) until ‖WᵀA + AᵀW‖_F/√numel < ``tol`` or ``max_iters`` msign calls; the
    result is projected exactly onto the tangent space and rescaled to ‖A‖₂ = 1.
    retract(Y) = polar factor msign(Y). Wide matrices are handled through their transpose.
    """

    name = "stiefel"

    def __init__(self, tol: float = 1e-5, max_iters: int = 100, step: float = 0.1, smoothing: float = 0.0):
        check_dual_settings("Stiefel", tol, max_iters, step)
        if not (isinstance(smoothing, (int, float)) and smoothing >= 0):
            raise ValueError(f"Stiefel: smoothing must be a number >= 0, got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.tol, self.max_iters, self.step_size = float(tol), int(max_iters), float(step)

    def __repr__(self):
        return (f"Stiefel(tol={self.tol}, max_iters={self.max_iters}, step={self.step_size}, "
                f"smoothing={self.smoothing})")

    # -- Gram-space pieces for the dual descent: P = identity, normal solve X = H/2
    @staticmethod
    def _project(H):
        return H

    @staticmethod
    def _normal_solve(H):
        return 0.5 * H

    def dualize(self, W, G, state=None):
        check_same_shape(W, G, "Stiefel.dualize")
        check_tensor(G, "Stiefel.dualize")
        dt, wide = compute_dtype(G), is_wide(W)
        Wt, Gt = as_tall(W.to(dt), wide), as_tall(G.to(dt), wide)
        A = steepest_tangent(Wt, Gt, self._project, self._normal_solve, state,
                             self.tol, self.max_iters, self.step_size, self.smoothing)
        return from_tall(A, wide).to(G.dtype)

    def retract(self, Y):
        check_tensor(Y, "Stiefel.retract")
        wide = is_wide(Y)
        return from_tall(polar(as_tall(Y.to(compute_dtype(Y)), wide)), wide).to(Y.dtype)

    def contains(self, W, tol=1e-4):
        check_tensor(W, "Stiefel.contains")
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        eye = torch.eye(Wt.size(-1), dtype=Wt.dtype, device=Wt.device)
        return bool(((Wt.mT @ Wt - eye).abs() <= tol).all())

    def norm(self, A):
        check_tensor(A, "Stiefel.norm")
        return spectral_norm(A).max()

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "Stiefel.random")
        if len(shape) < 2:
            raise ValueError(f"Stiefel.random: expected a matrix shape (..., out, in), got {shape}")
        return semi_orthogonal(shape, generator, dtype, device)

    def diagnostics(self, W):
        W = W.detach()
        Wt = as_tall(W.to(compute_dtype(W)), is_wide(W))
        eye = torch.eye(Wt.size(-1), dtype=Wt.dtype, device=Wt.device)
        return {"top_singular_value": float(spectral_norm(W).max()),
                "orthogonality_error": float((Wt.mT @ Wt - eye).abs().max())}
