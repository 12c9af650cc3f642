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

import torch

from .base import fro, inner, sym, unit_max_scale
from .quasi_newton import STEP_MIN, Curvature, SpectralPreconditioner

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
#: a warm-started solve whose schedule smooths from the start (DGram) also starts from the previous
#: solve's last μ, and for its first WARM_SMOOTHING[0] iterations μ stays ≤ WARM_SMOOTHING[1]·(that
#: μ), unless the first iteration's certified gap exceeds WARM_GAP_LIMIT, or by iteration
#: WARM_RELEASE[0] the gap has not fallen below WARM_RELEASE[1]·(the first gap): in both cases the
#: problem moved too far for the old μ to fit. Why a cap: the gap-tied rule alone read the first
#: iteration's large gap (20–36% on real MLP gradients: the primal bound lags the dual one) and
#: smoothed a good warm multiplier away (12 warm real solves each, without / with the first cap:
#: 512×128 at lr 0.054 179 / 90; 256×64 at lr 0.054 53 / 34). Why the release: under a tight cap a
#: problem that moved stalls (a square Gaussian DGram problem moved by 20% noise sat at a 14–16%
#: gap for the whole window), while the real solves halve their gap every ~2 iterations. Measured
#: with the current solver (spectral quasi-Newton, warm start from the certificate), mean iterations
#: of the 36 recorded real solves (512×128; 256×64; 256×64 at lr 0.2) and of 16 solves at steps
#: 96–99 of a tiny-preset run, and the total of 144 synthetic problems moved by 5–100% noise
#: (cold: 3 660):
#:   cap 2, window 15, limit 0.3, no release: 17.1 / 9.2 / 19.8, late 17.1 (max 28), 3 242
#:   cap 2, limit 0.5:                        17.1 / 9.2 / 14.8, late 13.2 (max 15), 3 487
#:   cap 1.25, limit 0.5, release (8, 0.5):   13.4 / 7.3 / 13.2, late 11.8 (max 15), 3 194 (worst
#:   warm/cold 2.16 against 2.72); cap 1 with the release: 11.3 / 7.3 / 13.5 but 29 iterations for a
#:   5% move (cold 26), release at 6 or 10 and windows of 5–8 measured worse. Not a gain everywhere:
#:   on synthetic warm sequences (24 problems, 3 steps each, G ← (1−ν)G + ν·noise) the old rule /
#:   cap 2 with the release / cap 1.25 with it took 1 141 / 1 139 / 1 249 iterations at ν = 5%,
#:   1 335 / 1 277 / 1 366 at 10%, 1 831 / 1 643 / 1 531 at 30%; real solves decided.
#: Dual iterations per step of the tiny preset over 4 windows of 25 training steps: 50.9, 43.6,
#: 61.8, 77.9 → 40.5, 37.1, 45.0, 56.0 (``bench_train_step.py --preset tiny``).
#: The window went from 15 to 30 iterations: late in a run (anchor GPT, steps 96–99) the MLP-output
#: solves' dual bound is within 0.1% of the optimum by iteration ~12 but the primal lags; at
#: iteration 16 the old window let μ jump 3–12× with the gap still at 3–4%, and the primal then
#: needed ~25 more iterations. 32 solves at steps 96–99: mean 27.3 (max 46) → 21.8 (max 38); the
#: synthetic warm sequences above 1 249 / 1 366 / 1 531 → 1 192 / 1 275 / 1 526; the other
#: recorded sets unchanged. Windows 25 / 40 / 60 / unbounded: 22.7 / 21.6 / 21.6 / 21.6 late, but
#: 1 569 / 1 568 / 1 577 / 1 647 at 30% drift. The synthetic totals move by ~3% with rounding alone
#: (after DGram's column normalisation changed, the same code read 1 189 / 1 314 / 1 573); the
#: recorded real solves did not move. Also tried since: smoothing c = 1.5, 2, 3.5 (2√2 kept), and
#: holding μ until the gap rule moves it by 1.4× or 2× (mixed: 5% drift better, 30% worse)
WARM_SMOOTHING = (30, 1.25)
WARM_RELEASE = (8, 0.5)
WARM_GAP_LIMIT = 0.5
#: an iterate whose dual bound exceeds the best one by this fraction has diverged (a long dual step
#: once smoothing reshapes the landscape: measured on rank-1-plus-noise gradients, the bound jumped
#: from 7.4 to 360 and never came back in 2000 iterations); the loop returns to the best multiplier,
#: forgets its curvature pairs and damps its steps RESTART_SHRINK times, doubling back to full length
#: on each iteration that does not diverge (undamped, a rank-2 Stiefel problem cycled restart →
#: diverge at a 1.95% gap until the cap)
DIVERGED, RESTART_SHRINK = 0.5, 10.0
#: every ALTERNATE iterations c drops to c/3 and back: a fixed c locked some rank-1 problems at 97-98%
#: (a cap μ ≤ 0.03 was tried too: it stalled rank-1 DGram at 97%)
ALTERNATE = 40
#: the lower bound (an eigvalsh and 3 n×n products, ~30% of an iteration) is computed on every
#: LOWER_BOUND_EVERY-th iteration until the certified gap is within NEAR_GAP × gap_tol, then on every
#: one. Measured on 96 recorded real DGram solves: every 2nd needed 1-9% fewer iterations and ran in
#: 0.79-0.89× the time (4 interleaved rounds); every 3rd needed 7-11% more iterations
LOWER_BOUND_EVERY, NEAR_GAP = 2, 3.0
#: a Gram matrix Γ = WᵀW whose off-diagonal entries are below this fraction of √(Γ_ii Γ_jj) is
#: treated as diagonal inside the loop (products with Γ and Γ⁻¹ become row scalings: 5 of 11 n×n
#: products per iteration saved); points retracted onto DGram or Stiefel in float32 have ~3e-7, and
#: the reported bound is recomputed with the full Γ at the end
DIAGONAL_GRAM = 1e-5
#: pairs kept by the limited-memory BFGS step (``quasi_newton.Curvature``). It replaced
#: Barzilai–Borwein steps along N(∇f): on 36 recorded warm-started real DGram solves at gap 8e-3,
#: mean dual iterations 512×128: 82 → 44, 256×64: 38 → 28, 256×64 at lr 0.2: 72 → 57
LBFGS_MEMORY = 3
#: the smallest tangent fraction ‖proj Ĝ‖_F/‖Ĝ‖_F the loop runs at; smaller ones are rescaled to it.
#: Real training gradients have 0.73–0.90 (DGram MLP, 144 recorded solves) and run unscaled: scaling
#: every problem to fraction 1 cost their mean iterations 2–5% (the constants were tuned at ‖Ĝ‖_F = √n)
TANGENT_FLOOR = 0.5


def off_diagonal(H: torch.Tensor) -> torch.Tensor:
    """Off(H): H with its diagonal set to zero."""
    return H - torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1))


def _inv_sqrt_values(e: torch.Tensor) -> torch.Tensor:
    """e^(-1/2) for ascending eigenvalues e, with those below a relative floor mapped to 0 (the
    pseudo-inverse square root: directions M does not reach get no weight)."""
    emax = e[..., -1:].clamp_min(0)
    floor = emax * (1e-12 if e.dtype == torch.float64 else 1e-6)
    tiny = torch.finfo(e.dtype).tiny
    return torch.where(e > floor.clamp_min(tiny), e.clamp_min(tiny).rsqrt(), torch.zeros_like(e))


def _stored(state: dict, key: str, like: torch.Tensor) -> torch.Tensor | None:
    value = state.get(key)
    return value.to(like) if isinstance(value, torch.Tensor) and value.shape == like.shape else None


def _warm_start(state: dict | None, lam0: torch.Tensor, alpha: torch.Tensor, mu2: torch.Tensor, smooths: bool,
                scale: torch.Tensor):
    """(Λ, step, μ², μ² cap) from the previous solve's ``state``, or None for a cold start. Λ is the
    previous solve's best dual multiplier (its ``certificate``): between optimizer steps the optimum
    multiplier moves less than its offset from the start Λ₀ (which follows the new gradient's noise).
    Mean iterations of the 36 recorded real DGram solves, offset of the best primal's multiplier
    from Λ₀ before / this: 46 / 34 (512×128), 21 / 18 (256×64), 38 / 38 (256×64 at lr 0.2)."""
    multiplier = None if state is None else _stored(state, "certificate", lam0)
    if state is None or multiplier is None:
        return None
    # state holds Λ, the step and μ in the units of Ĝ (‖Ĝ‖_F = √n); the loop runs ``scale`` × that
    sc = scale[..., None, None]
    multiplier = multiplier * sc
    step = _stored(state, "dual_step", alpha)
    step = None if step is None else step * sc
    prev_mu = _stored(state, "dual_smoothing", mu2) if smooths else None
    cap = None
    if prev_mu is not None:
        # μ = 0 (a solve certified before its first update) carries nothing: no cap
        mu2 = (prev_mu * scale).square()
        cap = torch.where(mu2 > 0, mu2, torch.full_like(mu2, math.inf))
    return multiplier, (alpha if step is None else step), mu2, cap


def _smoothing(k: int, c: float, gap_abs: torch.Tensor, n: int, gap: torch.Tensor, warm_mu2: torch.Tensor | None,
               first_gap: torch.Tensor | None):
    """(μ², warm cap, first gap) for iteration k: μ = c·gap/n (c/3 on alternate ``ALTERNATE``
    windows), capped by ``WARM_SMOOTHING`` after a warm start unless the first gap exceeds
    ``WARM_GAP_LIMIT`` or, by iteration ``WARM_RELEASE[0]``, the gap has not fallen below
    ``WARM_RELEASE[1]`` × the first gap."""
    if ALTERNATE > 0 and (k // ALTERNATE) % 2 == 1:
        c = c / 3
    mu2 = (c * gap_abs.clamp_min(0) / n).square()
    if warm_mu2 is not None and k < WARM_SMOOTHING[0]:
        if k == 1:  # a warm start far from the new problem's optimum: the gap rule alone
            warm_mu2 = torch.where(gap <= WARM_GAP_LIMIT, warm_mu2, torch.full_like(warm_mu2, math.inf))
            first_gap = gap
        elif k == WARM_RELEASE[0] and first_gap is not None:  # stalled under the cap: the problem moved
            warm_mu2 = torch.where(gap <= WARM_RELEASE[1] * first_gap, warm_mu2, torch.full_like(warm_mu2, math.inf))
        mu2 = torch.minimum(mu2, WARM_SMOOTHING[1] ** 2 * warm_mu2)
    return mu2, warm_mu2, first_gap


def _lower_bound_due(k: int, near: bool, max_iters: int) -> bool:
    """Whether iteration k computes the lower bound (``LOWER_BOUND_EVERY``, ``NEAR_GAP``)."""
    return near or k % LOWER_BOUND_EVERY == 1 % LOWER_BOUND_EVERY or k == max_iters


def _record(state: dict, dt: torch.dtype, gap: torch.Tensor, gap_tol: float, iters: int, warm: bool, *,
            step: torch.Tensor, smoothing: torch.Tensor | None, certificate: torch.Tensor,
            residual: torch.Tensor) -> None:
    """Write a solve's diagnostics and warm start into ``state``. Tensors are stored in the weight's
    dtype: torch.optim's load_state_dict casts state to it, and a resumed run must warm-start
    exactly as the uninterrupted one."""
    state["dual_step"] = step.detach().to(dt)
    if smoothing is not None:  # the smoothing μ reached, for the next warm start
        state["dual_smoothing"] = smoothing.detach().to(dt)
    # the multiplier of the best upper bound: ‖Ĝ + 2ŴΛ‖_* ≥ optimum for the solver's normalised
    # Ĝ (‖Ĝ‖_F = √n) and Ŵ; a certificate anyone can recheck with an SVD, and the next warm start
    state["certificate"] = certificate.detach().to(dt)
    state["iterations"] = iters
    state["duality_gap"] = gap.max().detach().to(dt)
    state["certified"] = bool((gap <= gap_tol * (1 + 1e-9) + 1e-12).all())
    state["warm_start"] = warm
    state["tangent_residual"] = residual.detach().to(dt)


def _no_tangent(W: torch.Tensor, state: dict | None, dt: torch.dtype, kept: torch.dtype) -> torch.Tensor:
    """The answer when no member's gradient has a tangent part: A = 0, exactly optimal. The warm
    start of the previous solve is kept for the next."""
    if state is not None:
        zero = torch.zeros((), dtype=kept)
        state.update(iterations=0, duality_gap=zero, certified=True, warm_start=False, tangent_residual=zero)
    return torch.zeros_like(W, dtype=dt)


def _gram_products(gram: torch.Tensor, gram_inv: torch.Tensor):
    """(diagonal, X ↦ ΓX, X ↦ Γ⁻¹X): row scalings when Γ is diagonal to ``DIAGONAL_GRAM``."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    root = d.clamp_min(0).sqrt()
    if bool((off_diagonal(gram).abs() <= DIAGONAL_GRAM * root.unsqueeze(-1) * root.unsqueeze(-2)).all()):
        rows, inv_rows = d.unsqueeze(-1), 1.0 / d.unsqueeze(-1)
        return True, (lambda X: rows * X), (lambda X: inv_rows * X)
    return False, (lambda X: gram @ X), (lambda X: gram_inv @ X)


def _normal_solver(gram: torch.Tensor, denom: torch.Tensor, diagonal: bool, offdiag: bool, project):
    """H ↦ X with P(ΓX + XΓ) = P(H): the multiplier of the tangent projection. Diagonal Γ (points on
    Stiefel or DGram): X = P(H) ⊘ (Γᵢᵢ + Γⱼⱼ). Stiefel off the manifold: the same division in Γ's
    eigenbasis, exact (the diagonal one left A_t off the tangent space by ~|Off(Γ)|). DGram has no
    such closed form for P = Off; its points off the manifold (bf16 storage: cosines ~1e-3) keep
    the diagonal solve, tangent to that accuracy."""
    if diagonal or offdiag:
        return lambda H: project(H) / denom
    d, Q = torch.linalg.eigh(gram)
    pair = d.unsqueeze(-1) + d.unsqueeze(-2)
    return lambda H: Q @ ((Q.mT @ H @ Q) / pair) @ Q.mT


def steepest_tangent(W: torch.Tensor, G: torch.Tensor, offdiag: bool, state: dict | None,
                     gap_tol: float, max_iters: int, state_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unit-spectral-norm tangent direction maximising ⟨G, A⟩ (W, G tall (..., m, n), same dtype).

    ``offdiag``: the constraint is Off(WᵀA + AᵀW) = 0 (DGram) instead of WᵀA + AᵀW = 0 (Stiefel).
    Stops when the certified relative gap is ≤ ``gap_tol`` or after ``max_iters`` iterations.
    Diagnostics written to ``state``: iterations, duality_gap (certified, relative), certified
    (gap ≤ gap_tol), tangent_residual, warm_start, certificate (the multiplier Λ of the best upper
    bound, which also warm-starts the next call, with ``dual_step`` and ``dual_smoothing``), in
    ``state_dtype`` (default W's): the weight's own dtype, which load_state_dict casts state to.
    """
    n = W.size(-1)
    dt = W.dtype
    kept = dt if state_dtype is None else state_dtype
    plain_iters, smoothing = SCHEDULES[bool(offdiag)]
    # everything in float64, the m×n products too: a tangent part of 1e-3‖G‖ under a large normal
    # one is lost to fp32 rounding of WᵀG (measured: a square Stiefel gradient from training
    # returned 97.3% of the optimum in fp32, 99.999% in float64); the answer is cast back at the end
    sdt = torch.float64
    W, G = W.to(sdt), G.to(sdt)
    # G scaled to ‖G‖_F = √n (positive scaling does not change the answer; one step size fits all)
    Gu, _ = unit_max_scale(G)
    gnorm = fro(Gu)
    Gn = torch.where(gnorm > 0, Gu * (math.sqrt(n) / gnorm.clamp_min(1e-30)), torch.zeros_like(Gu))

    gram = sym(W.mT @ W)
    gram_inv = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    P = W.mT @ Gn
    # the part of G off the span of W, formed explicitly: MᵀM = ZᵀΓ⁻¹Z + EᵀE then has no
    # cancellation (GᵀG − PᵀΓ⁻¹P would lose a small tangent part under a large normal one)
    E = Gn - W @ (gram_inv @ P)
    EtE = sym(E.mT @ E)
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    denom = d.unsqueeze(-1) + d.unsqueeze(-2)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    project = off_diagonal if offdiag else (lambda H: H)
    diagonal, gram_mul, gram_inv_mul = _gram_products(gram, gram_inv)

    def upper_bound(lam, gram_mul=gram_mul, gram_inv_mul=gram_inv_mul):  # (Z, F): WᵀM and MᵀM for M = G + 2WΛ
        Z = P + 2.0 * gram_mul(lam)
        return Z, Z.mT @ gram_inv_mul(Z) + EtE  # symmetric to rounding: eigh reads one triangle

    normal_solve = _normal_solver(gram, denom, diagonal, offdiag, project)
    lam0 = -0.5 * normal_solve(P + P.mT)
    batch = lam0.shape[:-2]
    # ‖M‖_F² at the start Λ₀ = ‖tangent projection of Ĝ‖_F²; a gradient without tangent part (to
    # rounding: ‖proj G‖ ≤ 1e-6‖G‖) has the zero direction as its answer, never rounding noise
    # blown up to unit norm, and needs no iteration
    start_Z, start_F = upper_bound(lam0)
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
    Gn, P, E, EtE, lam0 = Gn * sc, P * sc, E * sc, EtE * sc.square(), lam0 * sc
    start_Z, start_F = start_Z * sc, start_F * sc.square()  # Z is linear in (P, Λ), F quadratic
    lam, alpha = lam0, torch.full(batch + (1, 1), 0.1, dtype=sdt, device=W.device)
    damping = torch.ones_like(alpha)
    mu2, warm_mu2, first_gap = torch.zeros(batch, dtype=sdt, device=W.device), None, None
    # square Stiefel: the start Λ₀ is already optimal (item 3 of docs/manifolds.md), nothing to warm
    square_stiefel = not offdiag and W.size(-2) == n
    warm_start = None if square_stiefel else _warm_start(state, lam0, alpha, mu2, plain_iters == 0, scale)
    warm = warm_start is not None
    if warm_start is not None:
        lam, alpha, mu2, warm_mu2 = warm_start
        lam = project(sym(lam))  # a multiplier stored by another manifold (set_manifold) may break P(Λ) = Λ
        # a problem that moved far from the previous one can be better served by the cold start
        nuclear = lambda F: torch.linalg.eigvalsh(F).clamp_min(0).sqrt().sum(-1)  # noqa: E731
        lam = torch.where((nuclear(upper_bound(lam)[1]) <= nuclear(start_F))[..., None, None], lam, lam0)

    # a host sync per check: every iteration on the CPU, every few on accelerators
    check_every = CHECK_EVERY["cpu" if W.device.type == "cpu" else "accelerator"]
    best_lo = torch.full(batch, -math.inf, dtype=sdt, device=W.device)
    best_hi = torch.full(batch, math.inf, dtype=sdt, device=W.device)
    best_R, best_Y, best_X, hi_lam = (torch.zeros_like(gram),) * 3 + (lam,)
    prev_lam = prev_H = None
    curvature = Curvature(LBFGS_MEMORY)
    root_inv_denom = denom.rsqrt()
    fresh = torch.zeros(batch + (1, 1), dtype=torch.bool, device=W.device)  # no curvature pair yet after a restart
    iters = 0
    near = False
    for k in range(1, max_iters + 1):
        iters = k
        # WᵀM, MᵀM (a cold start's first iterate is Λ₀, whose are known)
        Z, F = (start_Z, start_F) if k == 1 and not warm else upper_bound(lam)
        e, V = torch.linalg.eigh(F + mu2[..., None, None] * torch.eye(n, dtype=sdt, device=W.device))
        sv2 = (e - mu2.unsqueeze(-1)).clamp_min(0)    # eigenvalues of F = MᵀM
        hi = sv2.sqrt().sum(-1)                        # ‖M‖_*: an upper bound
        inv = _inv_sqrt_values(e)
        R = (V * inv.unsqueeze(-2)) @ V.mT             # A_Λ = M·(MᵀM + μ²I)^(-1/2)
        Y = Z @ R                                      # WᵀA_Λ
        H = project(Y + Y.mT)                          # ∇f(Λ)
        X = normal_solve(H)                            # A_t = A_Λ − W·X is tangent
        if _lower_bound_due(k, near, max_iters):
            # lower bound ⟨G, A_t⟩/‖A_t‖₂ with ‖A_t‖₂² = λ_max(AᵀA − YᵀX − XᵀY + XᵀΓX), AᵀA = RFR
            score = (inv * sv2).sum(-1) - inner(Z, X)     # ⟨M, A_t⟩ = ⟨G, A_t⟩ for tangent A_t (⟨F, R⟩ = Σ sv2ᵢ·invᵢ)
            YtX = Y.mT @ X
            RFR = (V * (inv.square() * sv2).unsqueeze(-2)) @ V.mT
            At_gram = RFR - (YtX + YtX.mT) + X.mT @ gram_mul(X)
            lo = score / torch.linalg.eigvalsh(At_gram)[..., -1].clamp_min(1e-300).sqrt()
            better = lo > best_lo
            best_lo = torch.where(better, lo, best_lo)
            bm = better[..., None, None]
            best_R, best_Y, best_X = torch.where(bm, R, best_R), torch.where(bm, Y, best_Y), torch.where(bm, X, best_X)
        hi_lam = torch.where((hi < best_hi)[..., None, None], lam, hi_lam)
        best_hi = torch.minimum(best_hi, hi)
        gap = (best_hi - best_lo) / best_hi.abs().clamp_min(1e-300)
        if k == max_iters:
            break
        if k % check_every == 0 or k == 1:  # one host sync for both tests; the first iterate certifies
            # square Stiefel and many warm starts (on an H100, waiting for the 4th cost 3 iterations each)
            done, near = torch.stack([(gap <= gap_tol).all(), (gap <= NEAR_GAP * gap_tol).all()]).tolist()
            if done:
                break
        if k >= plain_iters:
            mu2, warm_mu2, first_gap = _smoothing(k, smoothing, best_hi - best_lo, n, gap, warm_mu2, first_gap)
        # restarted members return to the best multiplier with a shorter step and forget their pairs
        lost = (hi > (1 + DIVERGED) * best_hi)[..., None, None]
        if prev_lam is not None and prev_H is not None:
            curvature.add(lam - prev_lam, H - prev_H, ~fresh)
        prev_lam, prev_H = lam, H
        precondition = SpectralPreconditioner(V, e, root_inv_denom, project) if offdiag else normal_solve
        alpha = torch.where(lost, (alpha / RESTART_SHRINK).clamp_min(STEP_MIN), curvature.scale(alpha, precondition))
        curvature.forget(lost)
        damping = torch.where(lost, damping / RESTART_SHRINK, (2.0 * damping).clamp_max(1.0))
        lam = torch.where(lost, hi_lam, lam - damping * curvature.direction(H, alpha, precondition))
        fresh = lost

    # A = M·R − W·X = E·R + W·(Γ⁻¹ZR − X), then rescaled to ‖A‖₂ = 1 exactly
    best_C = gram_inv @ best_Y - best_X
    A = E @ best_R + W @ best_C
    if diagonal:  # the bound of the certificate with the full Γ (the loop's differs by ~|Off(Γ)|)
        _, F = upper_bound(hi_lam, lambda X: gram @ X, lambda X: gram_inv @ X)
        best_hi = torch.linalg.eigvalsh(sym(F)).clamp_min(0).sqrt().sum(-1)
    AtA = sym(A.mT @ A)
    top = torch.linalg.eigvalsh(AtA)[..., -1].clamp_min(0).sqrt()
    A = torch.where(has_tangent[..., None, None], A / top.clamp_min(1e-30)[..., None, None],
                    torch.zeros_like(A)).to(dt)
    if state is not None:  # the gap of what the caller gets: A in its own dtype
        exact = torch.where(has_tangent, inner(Gn, A.to(sdt)), torch.zeros_like(best_lo))
        gap = torch.where(has_tangent, (best_hi - exact) / best_hi.abs().clamp_min(1e-300), torch.zeros_like(exact))
        WtA = (gram @ best_C) / top.clamp_min(1e-30)[..., None, None]
        _record(state, kept, gap, gap_tol, iters, warm, step=alpha / sc,
                smoothing=mu2.sqrt() / scale if plain_iters == 0 else None, certificate=hi_lam / sc,
                residual=(torch.linalg.vector_norm(project(WtA + WtA.mT), dim=(-2, -1)) / n).max())
    return A
