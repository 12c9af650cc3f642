"""Warm starts of the Gram-space dual solve (``dual_ascent``) from the previous optimizer step:
the last certificate multiplier, the step length and, for DGram, the smoothing μ reached, which
caps μ for the first iterations of the next solve (docs/manifolds.md, item 6)."""
from __future__ import annotations

import math

import torch

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
#: the state entries a solve warm-starts from
WARM_KEYS = ("certificate", "dual_step", "dual_smoothing")
WARM_SMOOTHING = (30, 1.25)
WARM_RELEASE = (8, 0.5)
WARM_GAP_LIMIT = 0.5
#: every ALTERNATE iterations c drops to c/3 and back: a fixed c locked some rank-1 problems at 97-98%
#: (a cap μ ≤ 0.03 was tried too: it stalled rank-1 DGram at 97%)
ALTERNATE = 40


def stored(state: dict, key: str, like: torch.Tensor) -> torch.Tensor | None:
    value = state.get(key)
    return value.to(like) if isinstance(value, torch.Tensor) and value.shape == like.shape else None


def warm_start(state: dict | None, lam0: torch.Tensor, alpha: torch.Tensor, mu2: torch.Tensor, smooths: bool,
                scale: torch.Tensor, mu2_max: torch.Tensor):
    """(Λ, step, μ², μ² cap) from the previous solve's ``state``, or None for a cold start. Λ is the
    previous solve's best dual multiplier (its ``certificate``): between optimizer steps the optimum
    multiplier moves less than its offset from the start Λ₀ (which follows the new gradient's noise).
    Mean iterations of the 36 recorded real DGram solves, offset of the best primal's multiplier
    from Λ₀ before / this: 46 / 34 (512×128), 21 / 18 (256×64), 38 / 38 (256×64 at lr 0.2).
    Per member, stored values that cannot be a previous solve's are dropped (a corrupt or foreign
    state dict): a non-finite Λ for Λ₀, a non-finite or non-positive step for the default, and a
    non-finite μ, or one with μ² above ``mu2_max`` (‖M₀‖_F², beyond every singular value: μ² = 1e60
    cancelled the upper bound Σ√(eig(F + μ²I) − μ²) to ~0), for none."""
    multiplier = None if state is None else stored(state, "certificate", lam0)
    if state is None or multiplier is None:
        return None
    # state holds Λ, the step and μ in the units of Ĝ (‖Ĝ‖_F = √n); the loop runs ``scale`` × that
    sc = scale[..., None, None]
    multiplier = multiplier * sc
    multiplier = torch.where(torch.isfinite(multiplier).all(-1, keepdim=True).all(-2, keepdim=True), multiplier, lam0)
    step = stored(state, "dual_step", alpha)
    if step is not None:
        step = step * sc
        step = torch.where(torch.isfinite(step) & (step > 0), step, alpha)
    prev_mu = stored(state, "dual_smoothing", mu2) if smooths else None
    cap = None
    if prev_mu is not None:
        # μ = 0 (a solve certified before its first update) carries nothing: no cap
        mu2 = (prev_mu * scale).square()
        usable = torch.isfinite(mu2) & (mu2 <= mu2_max)
        mu2 = torch.where(usable, mu2, torch.zeros_like(mu2))
        cap = torch.where(mu2 > 0, mu2, torch.full_like(mu2, math.inf))
    return multiplier, (alpha if step is None else step), mu2, cap


def smoothing(k: int, c: float, gap_abs: torch.Tensor, n: int, gap: torch.Tensor, warm_mu2: torch.Tensor | None,
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
