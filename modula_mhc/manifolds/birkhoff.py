"""Birkhoff polytope: doubly-stochastic n×n matrices with positive entries (mHC's residual mixing).

One geometry throughout (docs/manifolds.md, "Birkhoff"):

* natural norm ‖A‖_B = max(max row ℓ1, max column ℓ1) — the ℓ∞→ℓ∞ and ℓ1→ℓ1 operator norms,
  hence also ≥ ‖A‖₂. Every doubly-stochastic W has ‖W‖_B = 1.
* dualize: the steepest direction of the Fisher metric (the metric of the multiplicative step),
  A = W ⊙ (G − α1ᵀ − 1βᵀ) with α, β making the row and column sums of A zero, scaled to ‖A‖_B = 1.
* step: the matching mirror (exponentiated-gradient) step Sinkhorn(W ⊙ exp(−lr·A ⊘ W)), then the
  move is limited to ‖ΔW‖_B ≤ lr·‖A‖_B along the chord (the polytope is convex) and the result is
  rounded onto the polytope exactly. In float64 internally: entries stay ≥ ``FLOOR``, row and
  column sums are 1 to rounding, at any lr.
"""
from __future__ import annotations

import torch

from ..kernels import sinkhorn
from .base import Manifold, check_shape, check_tensor, unit_max_scale

#: marginal tolerance of the Sinkhorn projections used by retract/step (computed in float64)
SINKHORN_TOL = 1e-12
#: Sinkhorn iteration cap inside retract/step; the exact rounding afterwards makes the result
#: doubly stochastic whether or not the cap was reached
SINKHORN_MAX_ITERS = 200
#: smallest entry the step keeps (log W stays finite; the marginals move by at most n·FLOOR)
FLOOR = 1e-30
#: largest |lr·A ⊘ W| the multiplicative step applies to one entry in one step (e^±30)
MAX_LOG_STEP = 30.0
#: a gradient whose tangent part is below this fraction of it is rounding noise: direction 0
NOISE_FLOOR = 1e-6


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


def operator_norm(A: torch.Tensor) -> torch.Tensor:
    """max(max row ℓ1, max column ℓ1) per matrix, shape (..., 1, 1)."""
    rows = A.abs().sum(dim=-1).amax(dim=-1)
    cols = A.abs().sum(dim=-2).amax(dim=-1)
    return torch.maximum(rows, cols)[..., None, None]


def fisher_projection(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The Fisher-metric tangent projection W ⊙ (G − α1ᵀ − 1βᵀ) at W > 0 (Douik & Hassibi 2018):
    α, β solve the row/column-sum equations, a (2n)×(2n) positive semi-definite system (null vector
    (1, −1)) solved by pseudo-inverse in the dtype of W (use float64)."""
    n = W.size(-1)
    WG = W * G
    rhs = torch.cat((WG.sum(-1), WG.sum(-2)), dim=-1).unsqueeze(-1)  # (..., 2n, 1)
    top = torch.cat((torch.diag_embed(W.sum(-1)), W), dim=-1)
    bottom = torch.cat((W.mT, torch.diag_embed(W.sum(-2))), dim=-1)
    M = torch.cat((top, bottom), dim=-2)
    ab = torch.linalg.pinv(M, hermitian=True) @ rhs
    alpha, beta = ab[..., :n, :], ab[..., n:, :].mT
    return W * (G - alpha - beta)


def round_to_polytope(F: torch.Tensor) -> torch.Tensor:
    """An exactly doubly-stochastic matrix near a non-negative F (Altschuler, Weed & Rigollet 2017,
    Alg. 2): scale rows, then columns, down to sums ≤ 1, then add err_r·err_cᵀ/‖err_r‖₁ (≥ 0).
    Moves F by at most 2× its ℓ1 marginal error; entries stay ≥ 0 (> 0 where F > 0)."""
    F = F * (1.0 / F.sum(-1, keepdim=True).clamp_min(1.0))
    F = F * (1.0 / F.sum(-2, keepdim=True).clamp_min(1.0))
    err_r = (1.0 - F.sum(-1, keepdim=True)).clamp_min(0.0)
    err_c = (1.0 - F.sum(-2, keepdim=True)).clamp_min(0.0)
    mass = err_r.sum(-2, keepdim=True)
    return F + torch.where(mass > 0, err_r * err_c / mass.clamp_min(1e-300), torch.zeros_like(F))


def _project(logits: torch.Tensor) -> torch.Tensor:
    """Sinkhorn(exp(logits)) in float64 to SINKHORN_TOL (at most SINKHORN_MAX_ITERS), then rounded."""
    P = sinkhorn(logits, tol=SINKHORN_TOL, max_iters=SINKHORN_MAX_ITERS, nonconvergence="ignore")
    return round_to_polytope(P)


def _scale(logits: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """``iters`` Sinkhorn–Knopp iterations on exp(logits) as scaling vectors (float64, no host sync;
    logits within ~700 of their max, as the step's are), not rounded. The step's matrices are within e^±(2·MAX_LOG_STEP) of a doubly-stochastic one and, for
    small lr, off the polytope by O(lr²) only, so a few iterations suffice."""
    K = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    Kt = K.mT
    u = K.sum(-1, keepdim=True).reciprocal_()
    for _ in range(iters):
        v = (Kt @ u).reciprocal_()
        u = (K @ v).reciprocal_()
    v = (Kt @ u).reciprocal_()  # columns last: column sums exact before rounding
    return u * K * v.mT


class Birkhoff(Manifold):
    """Doubly-stochastic matrices (rows and columns sum to 1, entries > 0), batched over leading dims.

    Tangent space: {A : A1 = 0, 1ᵀA = 0}. Natural norm ‖A‖_B = max(max row ℓ1, max column ℓ1):
    the ℓ∞→ℓ∞ operator norm (the one mixing acts with on streams measured by their max), the ℓ1→ℓ1
    norm, and ≥ ‖A‖₂ = the RMS→RMS norm (‖A‖₂² ≤ ‖A‖₁‖A‖_∞), so it serves both the Mix atom and a
    Linear on this manifold. Every doubly-stochastic matrix has norm exactly 1.

    dualize(W, G): the Fisher-metric steepest tangent direction A = W ⊙ (G − α1ᵀ − 1βᵀ), scaled to
    ‖A‖_B = 1 — an ascent direction (⟨G, A⟩ = Σ W_ij Y_ij² / ‖·‖ > 0), not the exact maximiser over
    the ‖·‖_B ball (a linear program). 0 when the tangent part of G is below 1e-6 of G (noise).
    step(W, A, lr): Sinkhorn(W ⊙ exp(−lr·A ⊘ W)) — the mirror step of that metric, so A ⊘ W is
    bounded for A from dualize — with |lr·A ⊘ W| capped at 30 per entry, then the move is shortened
    along the chord to ‖ΔW‖_B ≤ lr·‖A‖_B and rounded exactly onto the polytope. Equal to W − lr·A to
    first order; on the polytope (row and column sums 1 to float rounding) and > 0 at any lr.
    retract(Y): Sinkhorn–Knopp projection of Y (entries ≤ 0 first raised to 1e-12·max|Y|), rounded.
    All of it runs in float64 (n×n matrices are small) and returns the input dtype.
    """

    name = "birkhoff"

    def check_input(self, X, what):
        _check_square(X, what)

    def dualize(self, W, G, state=None):
        Gd = G.detach().to(torch.float64)
        Gu = Gd / Gd.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)  # scale-free (1e±30 grads)
        Wd = W.detach().to(torch.float64).clamp_min(FLOOR)
        T = zero_marginals(Gu)  # the tangent part (Frobenius): below NOISE_FLOOR of G it is rounding
        has_tangent = (T * T).sum(dim=(-2, -1), keepdim=True) > NOISE_FLOOR ** 2 * (Gu * Gu).sum(dim=(-2, -1), keepdim=True)
        A = fisher_projection(Wd, Gu)
        an = operator_norm(A)
        A = torch.where(has_tangent & (an > 0), A / an.clamp_min(1e-300), torch.zeros_like(A))
        if state is not None:
            state["iterations"] = 0
            state["tangent_residual"] = float(torch.maximum(A.sum(dim=-1).abs().amax(), A.sum(dim=-2).abs().amax())) \
                if A.numel() else 0.0
        return A.to(G.dtype)

    def retract(self, Y):
        Yu, amax = unit_max_scale(Y.detach().to(torch.float64))
        if bool((amax == 0).any()):
            raise ValueError("Birkhoff.retract: the zero matrix has no doubly-stochastic scaling")
        logits = Yu.clamp_min(1e-12).log()
        return _project(logits).to(Y.dtype)

    def step(self, W, A, lr):
        lr = float(lr)
        Wd = W.detach().to(torch.float64)
        Ad = A.detach().to(torch.float64)
        ok = torch.isfinite(Ad).all() & (Wd >= 0).all() & (Wd.sum(-1) > 0).all()  # (False for NaN W)
        if not bool(ok):
            raise ValueError("Birkhoff.step: W must be non-negative with positive row sums (retract it first) "
                             "and W, A finite")
        Wd = Wd.clamp_min(FLOOR)
        # mirror step: log of W ⊙ exp(−lr·A ⊘ W), each entry's factor within e^±MAX_LOG_STEP
        step = (Ad / Wd).mul_(-lr).clamp_(-MAX_LOG_STEP, MAX_LOG_STEP)
        D = round_to_polytope(_scale(Wd.log() + step)) - Wd
        # trust region: at most lr·‖A‖_B in the natural norm, along the chord W → P (inside the polytope)
        budget = lr * operator_norm(Ad)
        moved = operator_norm(D)
        s = (budget / moved.clamp_min(1e-300)).clamp_(max=1.0)
        return round_to_polytope(Wd + s * D).clamp_min_(FLOOR).to(W.dtype)

    def contains(self, W, tol=1e-4):
        _check_square(W, "Birkhoff.contains")
        Wd = W.to(torch.float64)
        rows_ok = ((Wd.sum(dim=-1) - 1).abs() <= tol).all()
        cols_ok = ((Wd.sum(dim=-2) - 1).abs() <= tol).all()
        return bool(rows_ok & cols_ok & (Wd >= -tol).all() & torch.isfinite(Wd).all())

    def norm(self, A):
        check_tensor(A, "Birkhoff.norm")
        Au, amax = unit_max_scale(A.to(torch.float64))
        return (operator_norm(Au) * amax).amax().to(torch.float32 if A.dtype != torch.float64 else torch.float64)

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "Birkhoff.random")
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"Birkhoff.random: expected a square shape (..., n, n), got {shape}")
        logits = torch.randn(shape, generator=generator, dtype=torch.float64)
        P = sinkhorn(logits, tol=1e-12, max_iters=10000, nonconvergence="ignore")
        return round_to_polytope(P).to(dtype=dtype, device=device)

    def diagnostics(self, W):
        Wd = W.detach().to(torch.float64)
        err = torch.maximum((Wd.sum(dim=-1) - 1).abs().max(), (Wd.sum(dim=-2) - 1).abs().max())
        return {"marginal_error": float(err), "min_entry": float(Wd.min()),
                "diagonal_mean": float(torch.diagonal(Wd, dim1=-2, dim2=-1).mean())}
