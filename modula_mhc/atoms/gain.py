"""Gain atom: learnable per-channel scale y = g ⊙ x."""
from __future__ import annotations

import torch

from ..module import Atom, Sharpness


class Gain(Atom):
    """y = g ⊙ x with g ∈ ℝ^d initialised to 1. Natural norm ‖g‖_∞ (= RMS→RMS operator norm of
    diag(g)); dualize: t·sign(G). Sensitivity 1 (at ‖g‖_∞ ≤ 1), sharpness (0, 1, 0)."""

    allowed_manifolds = {"euclidean"}
    preserves_dim = True

    def __init__(self, features, mass=1.0, role=None):
        super().__init__((features,), manifold="euclidean", mass=mass, role=role)
        self.in_dim = self.out_dim = features

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is not None:
            self.weight.fill_(1.0)
            self._tag()

    def forward(self, x):
        return x * self.weight

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return W.float().abs().max()

    def dualize_weight(self, G, target=1.0, state=None):
        return torch.sign(G) * target

    @torch.no_grad()
    def step_weight(self, A, lr):
        self.weight.sub_(lr * A)

    @torch.no_grad()
    def retract_(self):
        pass
