"""Normalisations without weights (a learnable scale is the Gain atom)."""
from __future__ import annotations

import math

import torch

from .._inputs import check_input
from ..module import Bond, Sharpness


class RMSNorm(Bond):
    """x ↦ x / RMS(x) over the last dim. The Jacobian is the projection orthogonal to x divided by
    RMS(x), so ‖DN·h‖ ≤ ‖h‖/RMS(x) and ‖D²N[h, k]‖ ≤ √2‖h‖‖k‖/RMS(x)² (docs/algebra.md).

    Domain: the declared constants, sensitivity 1 and γ = √2, hold for inputs of per-token
    RMS ≥ 1 only — no bound holds for all inputs (1/RMS is unbounded near 0), and the networks of
    this library do feed RMSNorm smaller inputs (a GPT's residual stream has RMS ≈ 0.3 at init).
    ``claims.certify(model, x)`` measures the smallest input RMS r and gives the local constants
    max(1, 1/r) and √2·max(1, 1/r)²."""

    preserves_dim = True

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def _inverse_rms(self):
        st = self.local_stats()
        if st is None:
            return 1.0
        r = st.get("min_rms", 1.0)
        return math.inf if r <= 0 else max(1.0, 1.0 / r)

    @property
    def sensitivity(self):
        return self._inverse_rms()

    @property
    def sharpness(self):
        return Sharpness(0.0, 0.0, math.sqrt(2) * self._inverse_rms() ** 2)

    def forward(self, x):
        check_input(x, "RMSNorm", min_dim=0)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class MeanSubtract(Bond):
    """x ↦ x − mean(x) over the last dim: an orthogonal projection, sensitivity 1, linear."""

    preserves_dim = True

    def forward(self, x):
        return x - x.mean(dim=-1, keepdim=True)
