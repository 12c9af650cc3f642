"""Normalisations without weights (a learnable scale is the Gain atom)."""
from __future__ import annotations

import math

import torch

from ..module import Bond, Sharpness


class RMSNorm(Bond):
    """x ↦ x / RMS(x) over the last dim. At unit-RMS inputs: sensitivity 1 (the Jacobian is the
    projection orthogonal to x divided by RMS(x)) and γ = √2 (docs/algebra.md)."""

    preserves_dim = True
    _sensitivity = 1.0
    _sharpness = Sharpness(0.0, 0.0, math.sqrt(2))

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class MeanSubtract(Bond):
    """x ↦ x − mean(x) over the last dim: an orthogonal projection, sensitivity 1, linear."""

    preserves_dim = True

    def forward(self, x):
        return x - x.mean(dim=-1, keepdim=True)
