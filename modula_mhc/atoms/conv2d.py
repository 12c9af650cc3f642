"""Conv2d atom: a Linear map on each k×k patch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._inputs import check_input
from ..module import Atom


class Conv2d(Atom):
    """Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, manifold="euclidean").

    Treated as a Linear map from each patch (in·k² features) to out features: the weight viewed
    as an (out, in·k²) matrix lives on the manifold at unit spectral scale and the forward pass
    applies the gain √(out/(in·k²)). A patch of pixels with RMS ≤ 1 has RMS ≤ 1, so with the
    per-pixel RMS norm (max over pixels) the sensitivity is 1 and the sharpness (0, 1, 0)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, manifold="euclidean",
                 mass=1.0, role=None):
        for name, v, least in (("stride", stride, 1), ("padding", padding, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"Conv2d: {name} must be an integer >= {least}, got {v!r}")
        k = kernel_size
        self.kernel_size, self.stride, self.padding = k, stride, padding
        super().__init__((out_channels, in_channels, k, k), manifold=manifold, mass=mass, role=role)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.gain = math.sqrt(out_channels / (in_channels * k * k))

    def _matrix(self, W):
        return W.reshape(W.shape[0], -1)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is None:
            return
        o = self.weight.shape[0]
        m = self.manifold.random((o, self.weight[0].numel()), generator=generator, dtype=self.weight.dtype,
                                 device=self.weight.device)
        self.weight.copy_(m.reshape(self.weight.shape))
        self._tag()

    def forward(self, x):
        check_input(x, f"Conv2d({self.in_channels}, {self.out_channels}, {self.kernel_size})", min_dim=3)
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding) * self.gain

    def weight_norm(self, W=None):
        return self.manifold.norm(self._matrix(self.weight if W is None else W))

    def dualize_weight(self, G, target=1.0, state=None):
        A = self.manifold._dualize(self._matrix(self.weight), self._matrix(G), state)
        return (target * A).reshape(G.shape)

    @torch.no_grad()
    def step_weight(self, A, lr):
        W = self.manifold._step(self._matrix(self.weight), self._matrix(A), lr)
        self.weight.copy_(W.reshape(self.weight.shape))

    @torch.no_grad()
    def retract_(self):
        if self.weight is not None:
            self.weight.copy_(self.manifold._retract(self._matrix(self.weight)).reshape(self.weight.shape))
