"""Primal polish for the Gram-space dual loop (``dual_ascent``): a feasible point nearer the optimum
than the rescaled tangent projection of the loop's iterate.

Near the optimum the dual bound converges fast and the primal lags (late anchor MLP solves: the
upper bound within 0.1% by iteration ~12, the lower 5% short). The loop's candidate A_t = A_Λ − W·X
is tangent with ‖A_t‖₂ = 1 + δ, and rescaling pays the whole δ, although the excess sits in the
directions of M's small singular values, which carry almost none of ⟨G, A⟩. A polish shrinks the
singular values s > 1 of A by s^(-CLIP_POWER), projects back onto the tangent space and scores the
result. Everything stays in the loop's n×n coordinates: A = E·R + W·C (E = Ĝ − WΓ⁻¹P ⟂ range W),
so AᵀA = RᵀEᵀER + CᵀΓC, WᵀA = ΓC and ⟨Ĝ, A⟩ = ⟨EᵀE, R⟩ + ⟨P, C⟩ exactly, for any R and C; the
loop keeps the polished point only where its bound is better, and rebuilds and rechecks its A at
the end (docs/manifolds.md, item 7).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import inner, sym
from .gram_ops import gram_mul, normal_solve

#: clip-and-project alternations per polish, and the power of the clip: singular values s > 1 are
#: scaled by s^(-CLIP_POWER), below 1 when the power exceeds 1, so that the projection, which pushes
#: the top singular values up again, lands them nearer 1. Measured on the 96 recorded real DGram
#: solves (mean iterations, mean alternations per solve; anchor steps 16–19 / 96–99, tiny 96–99):
#: none 14.4 / 21.8 / 11.8; power 1, 1 step 10.7 / 18.2 / 10.3 (2.8 / 3.7 / 1.4 alternations);
#: power 1, 2 steps 9.5 / 16.9 / 9.9 (3.1 / 4.8 / 2.1); power 2, 1 step 9.1 / 16.6 / 9.9 (1.2 / 2.1 /
#: 1.1); powers 1.5, 1.75, 2.25, 2.5, 3 with 1 step: no better
POLISH_STEPS, CLIP_POWER = 1, 2.0


def polish(R: torch.Tensor, C: torch.Tensor, AtA: torch.Tensor, EtE: torch.Tensor, P: torch.Tensor,
           times_gram: Callable, tangent_correction: Callable, steps: int = POLISH_STEPS):
    """(R, C, lower bound) after ``steps`` clip-and-project alternations of A = E·R + W·C.

    ``AtA`` is AᵀA of the input; ``times_gram(X)`` = ΓX; ``tangent_correction(H)`` = X with
    P(ΓX + XᵀΓ) = P(H), so that C − X makes A tangent. Lower bound: ⟨Ĝ, A⟩/‖A‖₂ of the output.
    """
    for _ in range(steps):
        e, V = torch.linalg.eigh(AtA)
        # singular values s of A above 1 scaled by s^(-CLIP_POWER), the others kept (e = s²)
        K = (V * e.clamp_min(1e-300).pow(-0.5 * CLIP_POWER).clamp_max(1.0).unsqueeze(-2)) @ V.mT
        R, C = R @ K, C @ K
        WtA = times_gram(C)
        C = C - tangent_correction(WtA + WtA.mT)
        AtA = sym(R.mT @ EtE @ R + C.mT @ times_gram(C))
    score = inner(EtE, R) + inner(P, C)
    return R, C, score / torch.linalg.eigvalsh(AtA)[..., -1].clamp_min(1e-300).sqrt()


#: the per-member tensors ``polish_near`` reads (those of ``gram_products`` and ``normal_solver``)
_POLISH_KEYS = ("rows", "inv_rows", "gram", "gram_inv", "denom", "eigenbasis", "pair", "EtE", "P")
#: device types on which only the near members are polished; elsewhere selecting them would cost a
#: host sync per iteration (the loop syncs once per check there), so every member is polished and
#: only the near ones keep the result (the same answers: ``tests/test_primal_polish.py``)
SELECT_ON = ("cpu",)


def polish_near(a: dict, R: torch.Tensor, C: torch.Tensor, At_gram: torch.Tensor, project) -> None:
    """Polish A = E·R + W·C of the members near their tolerance (``polish``) and keep it where its
    lower bound is better; stored as (R, Y = 0, X = −C), so that Γ⁻¹Y − X = C exactly."""
    near = a["near"]
    if near.device.type in SELECT_ON:
        sub = {key: a[key][near] for key in _POLISH_KEYS if key in a}
        sub["diagonal"] = a["diagonal"]
        R_near, C_near, lo_near = polish(R[near], C[near], At_gram[near], sub["EtE"], sub["P"],
                                         lambda Q: gram_mul(sub, Q), lambda H: normal_solve(sub, H, project))
        lo = torch.full_like(a["best_lo"], -math.inf)
        lo[near] = lo_near
        R, C = torch.zeros_like(R), torch.zeros_like(C)
        R[near], C[near] = R_near, C_near
    else:
        R, C, lo = polish(R, C, At_gram, a["EtE"], a["P"], lambda Q: gram_mul(a, Q),
                          lambda H: normal_solve(a, H, project))
        lo = torch.where(near, lo, torch.full_like(lo, -math.inf))
    better = lo > a["best_lo"]
    a["best_lo"] = torch.where(better, lo, a["best_lo"])
    bm = better[..., None, None]
    a["best_R"] = torch.where(bm, R, a["best_R"])
    a["best_Y"] = torch.where(bm, torch.zeros_like(R), a["best_Y"])
    a["best_X"] = torch.where(bm, -C, a["best_X"])
