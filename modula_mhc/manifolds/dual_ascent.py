"""Spectral-norm steepest tangent direction under Gram constraints, solved in the n×n Gram space.

Problem (W tall (..., m, n), m ≥ n; a projector P on symmetric n×n matrices picks the constraint:
P = identity for Stiefel, P = Off for DGram):

    max ⟨G, A⟩  s.t.  ‖A‖₂ ≤ 1,  P(WᵀA + AᵀW) = 0.

Dual: for a symmetric multiplier Λ = P(Λ), every feasible A has ⟨G, A⟩ = ⟨M, A⟩ ≤ ‖M‖_* with
M = G + 2WΛ, so f(Λ) = ‖M‖_* is an upper bound, minimised by descent along ∇f = P(WᵀA_Λ + A_Λᵀ W)
with A_Λ = msign(M) = M·F^{-1/2}, F = MᵀM. Everything the loop needs lives in n×n matrices:

    Z = WᵀM = P + 2ΓΛ,  F = ZᵀΓ⁻¹Z + EᵀE,  WᵀA_Λ = Z·F^{-1/2}   (Γ = WᵀW, P = WᵀG, E = G − WΓ⁻¹P)

so one iteration costs an n×n eigendecomposition, not an m×n polar factor, and is exact (no
Polar Express error). Each iterate also gives a feasible point: A_Λ projected onto the tangent
space (A − W·N(H)), rescaled to unit spectral norm; its score is a lower bound. The loop keeps
the best lower bound and the best upper bound and stops when they certify

    ⟨G, A⟩ ≥ (1 − gap_tol)·(upper bound) ≥ (1 − gap_tol)·optimum,

so ``duality_gap`` is the true certified relative gap, and the best iterate is what is returned.
A member near its tolerance also scores a polished iterate each iteration (``primal_polish``:
singular values above 1 shrunk, then projected back onto the tangent space): 16–37% fewer
iterations on recorded real solves.
Square Stiefel matrices are certified at the first iterate (the tangent projection is optimal).

Speed-ups: the start Λ₀ = −½N(P(WᵀG + GᵀW)) makes M the tangent projection of G; limited-memory
BFGS steps (``LBFGS_MEMORY``) preconditioned, for DGram, in the eigenbasis of MᵀM + μ²I
(``quasi_newton.SpectralPreconditioner``), for Stiefel by N (Barzilai–Borwein lengths along N(H) before: 2–4×
the iterations on real DGram gradients); a warm start from the previous
optimizer step (``state``: the last certificate multiplier, the step scale and, for DGram, the smoothing
μ reached, which bounds μ for the first iterations: ``WARM_SMOOTHING``); and smoothing of the nuclear norm with μ tied to the current gap
(F + μ²I, from the start for DGram, after 100 plain iterations for Stiefel: ``SCHEDULES``): the plain dual is nonsmooth where the optimum needs
singular values below 1 (ill-conditioned or low-rank G, DGram) and plain descent crawls there.
Per iteration: one eigh of F, one eigvalsh for the lower bound and 6 n×n products (6 more for DGram's
preconditioner; AᵀA = RFR from
the same eigenvectors; Γ as row scalings when it is diagonal: ``DIAGONAL_GRAM``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import fro, inner, sym, unit_max_scale
from .dual_record import _no_tangent, _record, _store, delivered_score
from .gram_ops import gram_mul, gram_products, inverse_gram, normal_solve, normal_solver, off_diagonal
from .primal_polish import polish_near
from .quasi_newton import STEP_MIN, Curvature, SpectralPreconditioner
from .warm_start import WARM_KEYS, warm_start
from .warm_start import smoothing as smooth

#: smoothing schedules: (plain iterations before smoothing starts, c in μ = c·gap/n). Measured on
#: Gaussian, rank-1 and condition-1e4 gradients, tall/wide/square, and real MLP gradients: Stiefel's
#: rank-1 problems stall when smoothed early, DGram's stall at a 4% gap unless smoothed from the start.
#: DGram's c went from 3√2 to 2√2 with the quasi-Newton steps: mean iterations of the 36 recorded
#: real solves 44 / 28 / 57 → 46 / 21 / 38 (512×128; 256×64; 256×64 at lr 0.2)
SCHEDULES = {False: (100, 3.0 * math.sqrt(2)), True: (0, 2.0 * math.sqrt(2))}
#: iterations between stopping tests (each is a host sync): every one on the CPU, every few on
#: accelerators, where a sync per iteration would stall the queue of small kernels; the first
#: iteration is always tested
CHECK_EVERY = {"cpu": 1, "accelerator": 4}
#: an iterate whose dual bound exceeds the best one by this fraction has diverged (a long dual step
#: once smoothing reshapes the landscape: measured on rank-1-plus-noise gradients, the bound jumped
#: from 7.4 to 360 and never came back in 2000 iterations); the loop returns to the best multiplier,
#: forgets its curvature pairs and damps its steps RESTART_SHRINK times, doubling back to full length
#: on each iteration that does not diverge (undamped, a rank-2 Stiefel problem cycled restart →
#: diverge at a 1.95% gap until the cap)
DIVERGED, RESTART_SHRINK = 0.5, 10.0
#: the lower bound (an eigvalsh and 3 n×n products, ~30% of an iteration) is computed on every
#: LOWER_BOUND_EVERY-th iteration until the certified gap is within NEAR_GAP × gap_tol, then on every
#: one. Measured on 96 recorded real DGram solves: every 2nd needed 1-9% fewer iterations and ran in
#: 0.79-0.89× the time (4 interleaved rounds); every 3rd needed 7-11% more iterations
LOWER_BOUND_EVERY, NEAR_GAP = 2, 3.0
#: pairs kept by the limited-memory BFGS step (``quasi_newton.Curvature``). It replaced
#: Barzilai–Borwein steps along N(∇f): on 36 recorded warm-started real DGram solves at gap 8e-3,
#: mean dual iterations 512×128: 82 → 44, 256×64: 38 → 28, 256×64 at lr 0.2: 72 → 57
LBFGS_MEMORY = 3
#: the smallest tangent fraction ‖proj Ĝ‖_F/‖Ĝ‖_F the loop runs at; smaller ones are rescaled to it.
#: Real training gradients have 0.73–0.90 (DGram MLP, 144 recorded solves) and run unscaled: scaling
#: every problem to fraction 1 cost their mean iterations 2–5% (the constants were tuned at ‖Ĝ‖_F = √n)
TANGENT_FLOOR = 0.5


def _inv_sqrt_values(e: torch.Tensor) -> torch.Tensor:
    """e^(-1/2) for ascending eigenvalues e, with those below a relative floor mapped to 0 (the
    pseudo-inverse square root: directions M does not reach get no weight)."""
    emax = e[..., -1:].clamp_min(0)
    floor = emax * (1e-12 if e.dtype == torch.float64 else 1e-6)
    tiny = torch.finfo(e.dtype).tiny
    return torch.where(e > floor.clamp_min(tiny), e.clamp_min(tiny).rsqrt(), torch.zeros_like(e))


def _lower_bound_due(k: int, max_iters: int) -> bool:
    """Whether iteration k computes the lower bound for every member (``LOWER_BOUND_EVERY``); members
    near their tolerance (``NEAR_GAP``) compute it on every iteration."""
    return k % LOWER_BOUND_EVERY == 1 % LOWER_BOUND_EVERY or k == max_iters


def scaled_gradient(G: torch.Tensor) -> torch.Tensor:
    """Ĝ = G·√n/‖G‖_F per matrix (0 stays 0): positive scaling does not change the answer, and the
    solver's step constants and stored certificates are in these units."""
    Gu, _ = unit_max_scale(G)  # no overflow of ‖G‖_F for 1e30 gradients
    gnorm = fro(Gu)
    return torch.where(gnorm > 0, Gu * (math.sqrt(G.size(-1)) / gnorm.clamp_min(1e-30)), torch.zeros_like(Gu))


def _upper_bound(a: dict, lam: torch.Tensor):
    """(Z, F): WᵀM and MᵀM for M = G + 2WΛ (F symmetric to rounding: eigh reads one triangle)."""
    Z = a["P"] + 2.0 * gram_mul(a, lam)
    return Z, Z.mT @ gram_mul(a, Z, inverse=True) + a["EtE"]


#: the per-member tensors of the loop that a compaction (members leaving once certified) selects from
_RESULTS = ("best_R", "best_Y", "best_X", "hi_lam", "best_hi", "alpha", "mu2")


def _compact(a: dict, curvature: Curvature, keep: torch.Tensor) -> None:
    """Keep only the members ``keep`` (bool, leading dim) in every per-member tensor of ``a``."""
    for key, value in a.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            a[key] = value[keep]
    curvature.select(keep)


def _set_aside(a: dict, out: dict, curvature: Curvature) -> None:
    """Members without tangent part (``a["idle"]``) leave before the first iteration (0 iterations,
    as alone): their answer is A = 0, and in the loop their bounds are rounding noise that never
    certifies (they ran to the cap beside the others)."""
    idle = a.pop("idle")
    if bool(idle.any()):
        _leave(a, out, idle, 0)
        _compact(a, curvature, ~idle)


def _leave(a: dict, out: dict, members: torch.Tensor, k: int) -> None:
    """Write the results of the active members ``members`` (bool) into the full-size ``out``."""
    idx = a["index"][members]
    for key in _RESULTS:
        out[key][idx] = a[key][members]
    out["iterations"][idx] = k


def steepest_tangent(W: torch.Tensor, G: torch.Tensor, offdiag: bool, state: dict | None,
                     gap_tol: float, max_iters: int, state_dtype: torch.dtype | None = None,
                     per_member: bool = False, answer_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unit-spectral-norm tangent direction maximising ⟨G, A⟩ (W, G tall (..., m, n), same dtype).

    ``offdiag``: the constraint is Off(WᵀA + AᵀW) = 0 (DGram) instead of WᵀA + AᵀW = 0 (Stiefel).
    Stops when the certified relative gap is ≤ ``gap_tol`` or after ``max_iters`` iterations; in a
    batch each member stops on its own (the loop goes on with the others only).
    Diagnostics written to ``state``: iterations, duality_gap (certified, relative), certified
    (gap ≤ gap_tol), tangent_residual, warm_start, certificate (the multiplier Λ of the best upper
    bound, which also warm-starts the next call, with ``dual_step`` and ``dual_smoothing``), in
    ``state_dtype`` (default W's): the weight's own dtype, which load_state_dict casts state to.
    A batch reports its worst member, or with ``per_member`` one entry per member (``_record``).
    """
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    W3, G3 = W.reshape(-1, m, n), G.reshape(-1, m, n)
    flat: dict | None = None
    if state is not None:  # the warm start, stored with the batch's shape
        flat = {k: v.reshape((-1,) + v.shape[len(batch):]) for k, v in state.items()
                if k in WARM_KEYS and isinstance(v, torch.Tensor) and v.shape[:len(batch)] == batch}
    A = _solve(W3, G3, offdiag, flat, gap_tol, max_iters, W.dtype if state_dtype is None else state_dtype,
               answer_dtype)
    if state is not None and flat is not None:
        _store(state, flat, batch, per_member)
    return A.reshape(W.shape)


def _solve(W: torch.Tensor, G: torch.Tensor, offdiag: bool, state: dict | None, gap_tol: float,
           max_iters: int, kept: torch.dtype, answer_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``steepest_tangent`` on a flat batch (B, m, n); ``state`` holds (B, …) tensors."""
    n, dt, B = W.size(-1), W.dtype, W.size(0)
    plain_iters, smoothing = SCHEDULES[bool(offdiag)]
    # everything in float64, the m×n products too: a tangent part of 1e-3‖G‖ under a large normal
    # one is lost to fp32 rounding of WᵀG (measured: a square Stiefel gradient from training
    # returned 97.3% of the optimum in fp32, 99.999% in float64); the answer is cast back at the end
    sdt = torch.float64
    W, G = W.to(sdt), G.to(sdt)
    Gn = scaled_gradient(G)

    gram = sym(W.mT @ W)
    gram_inv = inverse_gram(gram)
    P = W.mT @ Gn
    # the part of G off the span of W, formed explicitly: MᵀM = ZᵀΓ⁻¹Z + EᵀE then has no
    # cancellation (GᵀG − PᵀΓ⁻¹P would lose a small tangent part under a large normal one)
    E = Gn - W @ (gram_inv @ P)
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    denom = d.unsqueeze(-1) + d.unsqueeze(-2)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    project = off_diagonal if offdiag else (lambda H: H)
    a = gram_products(gram, gram_inv)
    a.update(normal_solver(gram, denom, a["diagonal"], offdiag), P=P, EtE=sym(E.mT @ E))
    lam0 = -0.5 * normal_solve(a, P + P.mT, project)
    # ‖M‖_F² at the start Λ₀ = ‖tangent projection of Ĝ‖_F²; a gradient without tangent part (to
    # rounding: ‖proj G‖ ≤ 1e-6‖G‖) has the zero direction as its answer, never rounding noise
    # blown up to unit norm, and needs no iteration
    start_Z, start_F = _upper_bound(a, lam0)
    tangent_sq = torch.diagonal(start_F, dim1=-2, dim2=-1).sum(-1)
    has_tangent = tangent_sq.sqrt() > 1e-6 * math.sqrt(n)
    if not bool(has_tangent.any()):
        return _no_tangent(W, state, dt, kept)
    # the loop's step constants (first step 0.1, STEP_MIN, STEP_MAX) suit a tangent projection of
    # Ĝ's order (‖·‖_F ≥ TANGENT_FLOOR·√n): a smaller one is scaled up to that (a mostly-normal
    # gradient whose tangent part is ε‖G‖ otherwise takes steps 1/ε too long and stalls at the step
    # floor: Stiefel 96×48 at ε = 1e-4 hit the 1000-iteration cap at a 1.9% gap); state keeps Ĝ's units
    scale = (TANGENT_FLOOR * (n / tangent_sq.clamp_min(1e-300)).sqrt()).clamp_min(1.0)
    scale = torch.where(has_tangent, scale, torch.ones_like(scale))
    sc = scale[..., None, None]
    Gn, E, lam0 = Gn * sc, E * sc, lam0 * sc
    a["P"], a["EtE"] = a["P"] * sc, a["EtE"] * sc.square()
    start_Z, start_F = start_Z * sc, start_F * sc.square()  # Z is linear in (P, Λ), F quadratic
    lam, alpha = lam0, torch.full((B, 1, 1), 0.1, dtype=sdt, device=W.device)
    mu2, warm_mu2 = torch.zeros(B, dtype=sdt, device=W.device), None
    # square Stiefel: the start Λ₀ is already optimal (item 3 of docs/manifolds.md), nothing to warm
    square_stiefel = not offdiag and W.size(-2) == n
    start = None if square_stiefel else warm_start(state, lam0, alpha, mu2, plain_iters == 0, scale,
                                                   torch.diagonal(start_F, dim1=-2, dim2=-1).sum(-1))
    if start is not None:
        lam, alpha, mu2, warm_mu2 = start
        lam = project(sym(lam))  # a multiplier stored by another manifold (set_manifold) may break P(Λ) = Λ
        # a problem that moved far from the previous one can be better served by the cold start
        nuclear = lambda F: torch.linalg.eigvalsh(F).clamp_min(0).sqrt().sum(-1)  # noqa: E731
        lam = torch.where((nuclear(_upper_bound(a, lam)[1]) <= nuclear(start_F))[..., None, None], lam, lam0)
    a.update(lam=lam, alpha=alpha, mu2=mu2, root_inv_denom=denom.rsqrt(), index=torch.arange(B, device=W.device),
             warm_mu2=warm_mu2, start_Z=None if start is not None else start_Z, start_F=start_F, idle=~has_tangent)
    full_P, full_EtE = a["P"], a["EtE"]  # the loop drops members from ``a`` as they certify
    out = _iterate(a, n, offdiag, project, gap_tol, max_iters, plain_iters, smoothing)

    # A = M·R − W·X = E·R + W·(Γ⁻¹ZR − X), then rescaled to ‖A‖₂ = 1 exactly
    best_C = gram_inv @ out["best_Y"] - out["best_X"]
    A = E @ out["best_R"] + W @ best_C
    full = {"diagonal": False, "gram": gram, "gram_inv": gram_inv, "P": full_P, "EtE": full_EtE}
    best_hi = out["best_hi"]
    if a["diagonal"]:  # the bound of the certificate with the full Γ (the loop's differs by ~|Off(Γ)|)
        best_hi = torch.linalg.eigvalsh(sym(_upper_bound(full, out["hi_lam"])[1])).clamp_min(0).sqrt().sum(-1)
    top = torch.linalg.eigvalsh(sym(A.mT @ A))[..., -1].clamp_min(0).sqrt()
    A = torch.where(has_tangent[..., None, None], A / top.clamp_min(1e-30)[..., None, None],
                    torch.zeros_like(A)).to(dt)
    if state is not None:  # the gap of what the caller gets: A in its own dtype
        exact = torch.where(has_tangent, delivered_score(Gn, A, answer_dtype), torch.zeros_like(best_hi))
        gap = torch.where(has_tangent, (best_hi - exact) / best_hi.abs().clamp_min(1e-300), torch.zeros_like(exact))
        WtA = (gram @ best_C) / top.clamp_min(1e-30)[..., None, None]
        _record(state, kept, gap, gap_tol, out["iterations"], has_tangent & (start is not None), step=out["alpha"] / sc,
                smoothing=out["mu2"].sqrt() / scale if plain_iters == 0 else None, certificate=out["hi_lam"] / sc,
                residual=torch.linalg.vector_norm(project(WtA + WtA.mT), dim=(-2, -1)) / n)
    return A


def _iterate(a: dict, n: int, offdiag: bool, project, gap_tol: float, max_iters: int, plain_iters: int,
             smoothing: float) -> dict:
    """The dual loop on the members of ``a`` (docs/manifolds.md, items 2–6); each member leaves it
    once certified. Returns the full-size results (``_RESULTS`` and per-member ``iterations``)."""
    lam = a["lam"]
    B, device, sdt = lam.size(0), lam.device, lam.dtype
    out = {key: a[key].clone() for key in ("lam", "alpha", "mu2")}
    out["hi_lam"] = out.pop("lam")
    out.update(best_R=torch.zeros_like(lam), best_Y=torch.zeros_like(lam), best_X=torch.zeros_like(lam),
               best_hi=torch.full((B,), math.inf, dtype=sdt, device=device),
               iterations=torch.zeros(B, dtype=torch.long, device=device))
    a.update(hi_lam=lam, best_R=out["best_R"], best_Y=out["best_Y"], best_X=out["best_X"], best_hi=out["best_hi"],
             best_lo=torch.full((B,), -math.inf, dtype=sdt, device=device), damping=torch.ones_like(a["alpha"]),
             fresh=torch.zeros((B, 1, 1), dtype=torch.bool, device=device),  # no curvature pair yet after a restart
             near=torch.zeros(B, dtype=torch.bool, device=device), first_gap=None, prev_lam=None, prev_H=None)
    curvature = Curvature(LBFGS_MEMORY)
    _set_aside(a, out, curvature)
    # a host sync per check: every iteration on the CPU, every few on accelerators
    check_every = CHECK_EVERY["cpu" if device.type == "cpu" else "accelerator"]
    eye = torch.eye(n, dtype=sdt, device=device)
    near = False
    for k in range(1, max_iters + 1):
        # WᵀM, MᵀM (a cold start's first iterate is Λ₀, whose are known)
        Z, F = (a["start_Z"], a["start_F"]) if k == 1 and a["start_Z"] is not None else _upper_bound(a, a["lam"])
        mu2 = a["mu2"]
        e, V = torch.linalg.eigh(F + mu2[..., None, None] * eye)
        sv2 = (e - mu2.unsqueeze(-1)).clamp_min(0)    # eigenvalues of F = MᵀM
        hi = sv2.sqrt().sum(-1)                        # ‖M‖_*: an upper bound
        inv = _inv_sqrt_values(e)
        R = (V * inv.unsqueeze(-2)) @ V.mT             # A_Λ = M·(MᵀM + μ²I)^(-1/2)
        Y = Z @ R                                      # WᵀA_Λ
        H = project(Y + Y.mT)                          # ∇f(Λ)
        X = normal_solve(a, H, project)               # A_t = A_Λ − W·X is tangent
        if near or _lower_bound_due(k, max_iters):
            # lower bound ⟨G, A_t⟩/‖A_t‖₂ with ‖A_t‖₂² = λ_max(AᵀA − YᵀX − XᵀY + XᵀΓX), AᵀA = RFR
            score = (inv * sv2).sum(-1) - inner(Z, X)     # ⟨M, A_t⟩ = ⟨G, A_t⟩ for tangent A_t (⟨F, R⟩ = Σ sv2ᵢ·invᵢ)
            YtX = Y.mT @ X
            RFR = (V * (inv.square() * sv2).unsqueeze(-2)) @ V.mT
            At_gram = RFR - (YtX + YtX.mT) + X.mT @ gram_mul(a, X)
            lo = score / torch.linalg.eigvalsh(At_gram)[..., -1].clamp_min(1e-300).sqrt()
            # a member takes it on its own schedule only: one near its tolerance must not change
            # another's iterates (a stacked member then takes the iterations it takes alone)
            better = (lo > a["best_lo"]) & (a["near"] | _lower_bound_due(k, max_iters))
            a["best_lo"] = torch.where(better, lo, a["best_lo"])
            bm = better[..., None, None]
            for key, value in (("best_R", R), ("best_Y", Y), ("best_X", X)):
                a[key] = torch.where(bm, value, a[key])
            if near:  # members near their tolerance also try the polished iterate (primal_polish.py)
                polish_near(a, R, gram_mul(a, Y, inverse=True) - X, At_gram, project)
        a["hi_lam"] = torch.where((hi < a["best_hi"])[..., None, None], a["lam"], a["hi_lam"])
        a["best_hi"] = torch.minimum(a["best_hi"], hi)
        gap = (a["best_hi"] - a["best_lo"]) / a["best_hi"].abs().clamp_min(1e-300)
        if k == max_iters:
            break
        if k % check_every == 0 or k == 1:  # one host sync for both tests; the first iterate certifies
            # square Stiefel and many warm starts (on an H100, waiting for the 4th cost 3 iterations each)
            done = gap <= gap_tol
            if bool(done.all()):
                break
            if bool(done.any()):  # certified members leave; the loop goes on with the others
                _leave(a, out, done, k)
                keep = ~done
                _compact(a, curvature, keep)
                e, V, H, hi, gap = e[keep], V[keep], H[keep], hi[keep], gap[keep]
            a["near"] = gap <= NEAR_GAP * gap_tol  # a member near its tolerance: its lower bound on every iteration
            near = bool(a["near"].any())
        _dual_step(a, curvature, k, e, V, H, hi, gap, n, offdiag, project, plain_iters, smoothing)
    _leave(a, out, torch.ones_like(a["best_hi"], dtype=torch.bool), k)
    return out


def _dual_step(a: dict, curvature: Curvature, k: int, e, V, H, hi, gap, n: int, offdiag: bool, project,
               plain_iters: int, smoothing: float) -> None:
    """One update of the active members' Λ (and μ, step, damping) in ``a``: limited-memory BFGS
    with the preconditioner of the iteration; diverged members restart from their best Λ."""
    if k >= plain_iters:
        a["mu2"], a["warm_mu2"], a["first_gap"] = smooth(k, smoothing, a["best_hi"] - a["best_lo"], n, gap,
                                                         a["warm_mu2"], a["first_gap"])
    # restarted members return to the best multiplier with a shorter step and forget their pairs
    lost = (hi > (1 + DIVERGED) * a["best_hi"])[..., None, None]
    lam = a["lam"]
    if a["prev_lam"] is not None and a["prev_H"] is not None:
        curvature.add(lam - a["prev_lam"], H - a["prev_H"], ~a["fresh"])
    a["prev_lam"], a["prev_H"] = lam, H
    precondition: Callable = SpectralPreconditioner(V, e, a["root_inv_denom"], project) if offdiag \
        else (lambda Q: normal_solve(a, Q, project))
    alpha, damping = a["alpha"], a["damping"]
    a["alpha"] = torch.where(lost, (alpha / RESTART_SHRINK).clamp_min(STEP_MIN), curvature.scale(alpha, precondition))
    curvature.forget(lost)
    a["damping"] = torch.where(lost, damping / RESTART_SHRINK, (2.0 * damping).clamp_max(1.0))
    # exactly P(Λ) = Λ, symmetric: the float32 preconditioner's rounding left Λ's skew part at ~4e-5
    # relative, and a skew part adds ⟨skew Λ, WᵀA⟩ to the bound, which is no longer one
    step = lam - a["damping"] * curvature.direction(H, a["alpha"], precondition)
    a["lam"] = torch.where(lost, a["hi_lam"], project(sym(step)))
    a["fresh"] = lost
