"""Element-wise activations with worst-case constants.

Convention: sensitivity is the worst-case Lipschitz constant max|φ'| (not Modula's typical-case
1/√2 for ReLU), so "measured ≤ claimed" holds for every input. Sharpness: an element-wise map
with |φ''| ≤ c has ‖φ''(x)⊙h⊙k‖_RMS ≤ c·√d·‖h‖_RMS‖k‖_RMS on width d (the bound is attained by
directions concentrated on one coordinate), so γ = c·√d; the width is bound by the algebra from
the neighbouring modules (γ = ∞ while unknown). ReLU and Abs are not twice differentiable: γ = ∞.
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from .. import scalars as S
from ..module import Bond, Sharpness


class _Elementwise(Bond):
    preserves_dim = True
    lipschitz = 1.0      # max |φ'|
    curvature = 0.0      # max |φ''| (inf: not twice differentiable)

    def __init__(self, width=None):
        super().__init__()
        self.in_dim = self.out_dim = width

    @property
    def sensitivity(self):
        return self.lipschitz

    @property
    def sharpness(self):
        if self.curvature == 0:
            return Sharpness(0.0, 0.0, 0.0)
        if math.isinf(self.curvature) or self.in_dim is None:
            return Sharpness(0.0, 0.0, S.infinity(self.in_dim))
        return Sharpness(0.0, 0.0, self.curvature * S.sqrt(self.in_dim))


class ReLU(_Elementwise):
    """max(x, 0): sensitivity 1, not smooth (γ = ∞)."""

    curvature = math.inf

    def forward(self, x):
        return F.relu(x)


class Abs(_Elementwise):
    """|x|: sensitivity 1, not smooth (γ = ∞)."""

    curvature = math.inf

    def forward(self, x):
        return x.abs()


class GELU(_Elementwise):
    """x·Φ(x) (exact erf form): max|φ'| = 1.12890, max|φ''| = 2φ(0) = √(2/π)."""

    lipschitz = 1.1289041451825208
    curvature = math.sqrt(2 / math.pi)

    def forward(self, x):
        return F.gelu(x)


class SiLU(_Elementwise):
    """x·σ(x): max|φ'| = 1.09984, max|φ''| = 1/2."""

    lipschitz = 1.0998393201285284
    curvature = 0.5

    def forward(self, x):
        return F.silu(x)
