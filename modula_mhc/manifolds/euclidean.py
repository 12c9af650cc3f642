"""Euclidean: no constraint, spectral norm. Dualize = msign(G): this is Muon."""
from __future__ import annotations

import torch

from ..kernels import msign
from ..kernels.reference import polar_express_gain
from .base import (
    Manifold,
    check_shape,
    check_tensor,
    compute_dtype,
    semi_orthogonal,
    spectral_norm,
    unit_max_scale,
)


class Euclidean(Manifold):
    """Euclidean(msign_steps=6): all of ℝ^{out×in} with the spectral norm ‖A‖₂ (a vector is
    treated as a column, so its norm is ℓ2).

    dualize(W, G) = msign(G)/g ≈ U Vᵀ for G = U Σ Vᵀ, by ``msign_steps`` Polar Express steps after
    msign's tight start (G scaled by ‖GGᵀ‖_F^{1/2}, in place of the first step), divided by the
    iteration's largest possible gain g (``polar_express_gain``; only fewer than 6 steps have g > 1)
    so that ‖A‖₂ ≤ 1 always, in the compute dtype (a bf16/fp16 gradient gets A rounded to its own
    dtype: ‖A‖₂ within HALF_TOL_EPS·eps of 1, up to 1.0025 measured in bf16). 6 steps, the default,
    leave the singular values Polar Express is designed for within 2e-5 of 1 (‖A‖₂ within 3.4e-6)
    — so ``norm(dualize(g, t)) == t`` holds; 5 steps cost 5/6 but leave ‖A‖₂ up to 0.4% short of 1. Tests: tests/test_kernels_reference.py and
    tests/test_kernel_ranges.py (the bounds), tests/test_batched_step.py (⟨G, A⟩ ≥ 0.99‖G‖_*).
    retract = identity; random = a semi-orthogonal matrix (unit spectral scale).
    """

    name = "euclidean"
    admits_scaling = True
    batched_dualize = True
    dualize_reads_point = False
    min_ndim = 1

    def __init__(self, msign_steps: int = 6):
        if not (isinstance(msign_steps, int) and not isinstance(msign_steps, bool) and msign_steps >= 1):
            raise ValueError(f"Euclidean: msign_steps must be an int >= 1, got {msign_steps!r}")
        self.msign_steps = msign_steps

    def __repr__(self):
        return f"Euclidean(msign_steps={self.msign_steps})"

    def dualize(self, W, G, state=None):
        dt = compute_dtype(G)
        if G.ndim == 1:
            Gu, _ = unit_max_scale(G.to(dt), dims=(-1,))
            norm = torch.linalg.vector_norm(Gu)
            A = Gu / norm if norm > 0 else torch.zeros_like(Gu)
        else:  # msign scales each matrix by its max |entry| itself: 1e-30 and 1e30 gradients are safe
            A = msign(G.to(dt), self.msign_steps)
            gain = polar_express_gain(self.msign_steps)  # cached per step count
            if gain > 1:
                A = A / gain
        if state is not None:
            state["iterations"] = 0
            state["tangent_residual"] = 0.0
        return A.to(G.dtype)

    def retract(self, Y):
        return Y

    def step(self, W, A, lr):
        return W - lr * A

    def _step_(self, W, A, lr):
        W.add_(A, alpha=-lr)  # one pass, no temporary

    def contains(self, W, tol=None):
        check_tensor(W, "Euclidean.contains", min_ndim=1)
        return bool(torch.isfinite(W).all())

    def norm(self, A):
        check_tensor(A, "Euclidean.norm", min_ndim=1)
        if A.ndim == 1:  # scaled by max|A| first: a 1e20 float32 vector had norm inf
            Au, amax = unit_max_scale(A.to(compute_dtype(A)), dims=(-1,))
            return torch.linalg.vector_norm(Au) * amax.reshape(())
        return spectral_norm(A).max()

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        return semi_orthogonal(check_shape(shape, "Euclidean.random"), generator, dtype, device)

    def diagnostics(self, W):
        if W.ndim < 2:
            return {"norm": float(self.norm(W.detach()))}
        return {"top_singular_value": float(spectral_norm(W.detach()).max())}


__all__ = ["Euclidean"]
