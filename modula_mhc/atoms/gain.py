"""Gain atom: learnable per-channel scale y = g ⊙ x."""
from __future__ import annotations

from .._inputs import check_input
from ._free import MaxAbsAtom


class Gain(MaxAbsAtom):
    """y = g ⊙ x with g ∈ ℝ^d initialised to 1. Natural norm ‖g‖_∞ (= RMS→RMS operator norm of
    diag(g)); dualize: t·sign(G). Sensitivity 1 (at ‖g‖_∞ ≤ 1), sharpness (0, 1, 0)."""

    preserves_dim = True

    def __init__(self, features, mass=1.0, role=None):
        super().__init__((features,), manifold="euclidean", mass=mass, role=role)
        self.in_dim = self.out_dim = features

    def forward(self, x):
        check_input(x, f"Gain({self.in_dim})", width=self.in_dim)
        return x * self.weight
