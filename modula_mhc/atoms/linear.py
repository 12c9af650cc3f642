"""Linear atom: y = √(fan_out/fan_in) · W x with W on a matrix manifold."""
from __future__ import annotations

import math

import torch.nn.functional as F

from .. import scalars as S
from .._inputs import check_input
from ..module import Atom


class Linear(Atom):
    """Linear(in_features, out_features, manifold="euclidean", mass=1, bias=False).

    The stored weight W (out, in) lives on its manifold at unit spectral scale (a semi-orthogonal
    matrix at init); the forward pass applies the fixed gain √(fan_out/fan_in), so the natural
    norm ‖W‖₂ equals the RMS→RMS operator norm of the map. Dualize: t·msign(G) (Muon) or the
    manifold's constrained steepest direction. Sensitivity 1, sharpness (0, 1, 0).

    Not a drop-in ``nn.Linear``: the output is scaled by √(out/in) (an ``nn.Linear`` weight W gives
    the same map here as ``W / √(out/in)``) and there is no bias by default.
    ``bias=True`` returns ``Linear(...) + Bias(out_features)``: the bias is its own atom with its
    own norm, so the result is a compound (a ``Sum``; ``isinstance(..., Linear)`` is False then and
    its two atoms are ``.atoms()``).
    """

    def __new__(cls, in_features=None, out_features=None, manifold="euclidean", mass=1.0, bias=False, role=None):
        if bias:
            from .bias import Bias
            return Linear(in_features, out_features, manifold=manifold, mass=mass, role=role) + \
                Bias(out_features, mass=mass)
        return super().__new__(cls)

    def __init__(self, in_features, out_features, manifold="euclidean", mass=1.0, bias=False, role=None):
        super().__init__((out_features, in_features), manifold=manifold, mass=mass, role=role)
        self.in_features, self.out_features = in_features, out_features
        self.in_dim, self.out_dim = in_features, out_features
        self.gain = S.sqrt(S.fraction(out_features, in_features, like=in_features)) if self.symbolic \
            else math.sqrt(out_features / in_features)

    def _repr_dims(self):
        return f"{self.in_features}, {self.out_features}"

    def forward(self, x):
        check_input(x, f"Linear({self.in_features}, {self.out_features})", width=self.in_features)
        return F.linear(x, self.weight) * self.gain
