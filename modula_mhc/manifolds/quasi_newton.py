"""Limited-memory BFGS steps for the Gram-space dual of ``dual_ascent``: curvature pairs kept per
batch member, and the spectral preconditioner DGram's steps start from (docs/manifolds.md, item 4)."""
from __future__ import annotations

import torch

from .base import inner

#: the scale of the initial inverse Hessian (⟨s, y⟩/⟨y, N(y)⟩ of the newest pair) is clamped to this
#: range (in units of the normalised problem)
STEP_MIN, STEP_MAX = 1e-4, 10.0
#: DGram's quasi-Newton steps start from ``SpectralPreconditioner``, whose rᵢ + rⱼ gets
#: SPECTRAL_BLEND·mean(r) added: without it low-rank DGram problems with spread column norms took up
#: to 837 iterations (a 90-solve sweep: 6 680 in all), with 0.5 at most 75 (1 759 in all; 1.0: 87,
#: 1 840); the 36 recorded real solves 17 / 9 / 20 iterations. Stiefel keeps the diagonal solve: its
#: first 100 iterations are unsmoothed (r = 1/σ unbounded) and a rank-2 problem stalled at 0.9–1.6%
#: with the spectral one, blend 0.5 to 2 (sweep totals 4 118 diagonal, 4 300 spectral after 100)
SPECTRAL_BLEND = 0.5
#: the dtype of the preconditioner's products (6 n×n per iteration). float32 left every iteration
#: count of the recorded real solves unchanged (anchor steps 16–19 / 96–99, tiny 96–99: 14.4 / 21.8 /
#: 11.8) and took the anchor solves' CPU time from 8.2–8.5 to 7.7–8.4 s (1 thread, 3 interleaved
#: rounds on a shared machine): a few percent; on a GPU the float64 products cost far more
PRECONDITIONER_DTYPE = torch.float32


class Curvature:
    """Limited-memory BFGS for a batch of dual problems (no host syncs): the last ``memory`` pairs
    s = Λₖ − Λₖ₋₁, y = ∇f(Λₖ) − ∇f(Λₖ₋₁), a pair counting (ρ = 1/⟨s, y⟩) only for members where it
    is valid and ⟨s, y⟩ > 0; the initial inverse Hessian is γ·N, N the preconditioner of the
    iteration (a callable; its ``curvature(y)``, when it has one, is ⟨y, N(y)⟩)."""

    def __init__(self, memory: int):
        if memory < 1:
            raise ValueError(f"Curvature: memory must be >= 1 pair, got {memory}")
        self.memory = memory
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, s: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> None:
        sy = inner(s, y)[..., None, None]
        rho = torch.where(valid & (sy > 0), 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        self.pairs = (self.pairs + [(s, y, rho)])[-self.memory:]

    def forget(self, members: torch.Tensor) -> None:
        """Drop every pair of these members (a restart)."""
        self.pairs = [(s, y, torch.where(members, torch.zeros_like(rho), rho)) for s, y, rho in self.pairs]

    def select(self, keep: torch.Tensor) -> None:
        """Keep the pairs of the members ``keep`` only (bool over the leading dim): members leave a
        batched solve once certified."""
        self.pairs = [(s[keep], y[keep], rho[keep]) for s, y, rho in self.pairs]

    def scale(self, previous: torch.Tensor, precondition) -> torch.Tensor:
        """γ = ⟨s, y⟩/⟨y, N(y)⟩ of the newest pair, clamped to [STEP_MIN, STEP_MAX]; ``previous``
        where that pair does not count."""
        if not self.pairs:
            return previous
        s, y, rho = self.pairs[-1]
        curvature = getattr(precondition, "curvature", None)
        yNy = curvature(y) if curvature is not None else inner(y, precondition(y))
        gamma = (inner(s, y) / yNy.clamp_min(1e-300))[..., None, None]
        return torch.where(rho > 0, gamma.clamp(STEP_MIN, STEP_MAX), previous)

    def direction(self, g: torch.Tensor, gamma: torch.Tensor, precondition) -> torch.Tensor:
        """The two-loop recursion: an approximation of (∇²f)⁻¹g from the pairs and γ·N."""
        coefficients = []
        for s, y, rho in reversed(self.pairs):
            a = rho * inner(s, g)[..., None, None]
            coefficients.append(a)
            g = g - a * y
        r = gamma * precondition(g)
        for (s, y, rho), a in zip(self.pairs, reversed(coefficients)):
            r = r + (a - rho * inner(y, r)[..., None, None]) * s
        return r


class SpectralPreconditioner:
    """N(Q) = P(C ⊙ V[(Vᵀ(C ⊙ Q)V) ⊘ (rᵢ + rⱼ)]Vᵀ) with Cᵢⱼ = (Γᵢᵢ + Γⱼⱼ)^(-1/2) and
    V diag(r⁻²) Vᵀ = MᵀM + μ²I. For Γ = cI it is the inverse of the Hessian's first term,
    D ↦ 2P(ΓDR + RDΓ) with R = (MᵀM + μ²I)^(-1/2) (the term through dR is left to the quasi-Newton
    pairs); with R = I it is the diagonal solve Q ⊘ (Γᵢᵢ + Γⱼⱼ) it replaced, up to a factor. That solve
    ignored that directions along small singular values of M curve ~1/μ and those along large
    ones ~1/σ. C enters on both sides so that N stays symmetric and positive, as BFGS needs.

    Its products run in float32 (``PRECONDITIONER_DTYPE``) and it returns the caller's dtype: N only
    steers the steps, every bound is computed in float64 from Λ itself."""

    def __init__(self, V: torch.Tensor, e: torch.Tensor, root_inv_denom: torch.Tensor, project):
        # eigenvalues below 1e-12 of the largest count as that floor: never a division by ~0
        r = e.clamp_min(e[..., -1:].clamp_min(1e-300) * 1e-12).rsqrt()
        tau = SPECTRAL_BLEND * r.mean(-1, keepdim=True).unsqueeze(-1)
        low = PRECONDITIONER_DTYPE
        self.dtype, self.project = V.dtype, project
        self.V, self.c = V.to(low), root_inv_denom.to(low)
        self.rsum = (r.unsqueeze(-1) + r.unsqueeze(-2) + tau).to(low)

    def _spectral(self, Q: torch.Tensor) -> torch.Tensor:
        return self.V.mT @ (self.c * Q.to(self.V.dtype)) @ self.V

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        return self.project(self.c * (self.V @ (self._spectral(Q) / self.rsum) @ self.V.mT)).to(self.dtype)

    def curvature(self, y: torch.Tensor) -> torch.Tensor:
        """⟨y, N(y)⟩ in two products, for y = P(y) (differences of projected gradients)."""
        t = self._spectral(y)
        return inner(t, t / self.rsum).to(self.dtype)
