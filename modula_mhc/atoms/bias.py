"""Bias atom: f(b, x) = x-shaped broadcast of b (used as ``Linear + Bias``)."""
from __future__ import annotations

import torch

from ..module import Atom, Sharpness


class Bias(Atom):
    """A learnable offset b ∈ ℝ^d, output b broadcast over x's leading dims (it ignores x's
    values, so sensitivity 0). Natural norm ‖b‖_RMS; dualize: t·G/‖G‖_RMS. Init 0."""

    allowed_manifolds = {"euclidean"}

    def __init__(self, features, mass=1.0, role=None):
        super().__init__((features,), manifold="euclidean", mass=mass, role=role)
        self.out_dim = features  # any input width: only the leading dims of x are used

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is not None:
            self.weight.zero_()
            self._tag()

    def forward(self, x):
        return self.weight.expand(*x.shape[:-1], -1)

    @property
    def sensitivity(self):
        return 0.0

    @property
    def sharpness(self):
        return Sharpness(0.0, 0.0, 0.0)

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return W.float().pow(2).mean().sqrt()

    def dualize_weight(self, G, target=1.0, state=None):
        rms = G.float().pow(2).mean().sqrt()
        return torch.where(rms > 0, G / rms.clamp_min(1e-30), torch.zeros_like(G)) * target

    @torch.no_grad()
    def step_weight(self, A, lr):
        self.weight.sub_(lr * A)

    @torch.no_grad()
    def retract_(self):
        pass
