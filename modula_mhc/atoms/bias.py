"""Bias atom: f(b, x) = x-shaped broadcast of b (used as ``Linear + Bias``)."""
from __future__ import annotations

from .._inputs import check_input
from ..module import Sharpness
from ._free import RMSAtom


class Bias(RMSAtom):
    """A learnable offset b ∈ ℝ^d, output b broadcast over x's leading dims (it ignores x's
    values, so sensitivity 0). Natural norm ‖b‖_RMS; dualize: t·G/‖G‖_RMS. Init 0."""

    def __init__(self, features, mass=1.0, role=None):
        super().__init__((features,), manifold="euclidean", mass=mass, role=role)
        self.out_dim = features  # any input width: only the leading dims of x are used

    def forward(self, x):
        check_input(x, f"Bias({self.out_dim})")
        return self.weight.expand(*x.shape[:-1], -1)

    @property
    def sensitivity(self):
        return 0.0

    @property
    def sharpness(self):
        return Sharpness(0.0, 0.0, 0.0)
