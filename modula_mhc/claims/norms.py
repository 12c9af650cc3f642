"""The norms the claims are stated in: max over tokens of the per-token RMS, and its dual map."""
from __future__ import annotations

import torch

_FD = 1e-5      # central-difference step for first derivatives (float64)
_FD2 = 1e-4     # for second derivatives


def seq_norm(y) -> torch.Tensor:
    """Max over tokens (all leading dims) of the per-token RMS over the last dim."""
    return y.pow(2).mean(dim=-1).sqrt().max()


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Every token rescaled to RMS 1 (a well-normed input)."""
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-300)


def _soft_norm(y, p=4.0) -> torch.Tensor:
    """(mean over tokens of RMS_t^p)^(1/p): the ascent objective. The max over tokens passes its
    gradient to one token only, which traps the ascent (a causal model's first token attends to
    itself alone); this smooth surrogate feeds every token, and the true max is what is reported."""
    return y.pow(2).mean(dim=-1).pow(p / 2).mean().pow(1 / p)


def _dual(g: torch.Tensor) -> torch.Tensor:
    """argmax ⟨g, d⟩ over ‖d‖ ≤ 1 in the max-over-tokens RMS norm: d_t = g_t / RMS(g_t)."""
    return g / g.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-300)

