"""Multi-layer perceptrons: MLP and the residual ResMLP."""
from __future__ import annotations

from .. import atoms, bonds
from ..algebra import Compose, repeat, residual
from ._util import activation, check_positive_int


class MLP(Compose):
    """MLP(in_features, out_features, width, depth): ``depth`` Linear atoms with an activation
    between them (depth = 1 is a single Linear). Sensitivity (max|φ'|)^(depth−1)."""

    def __init__(self, in_features, out_features, width, depth, activation_fn="gelu", manifold="euclidean"):
        for n, v in (("in_features", in_features), ("out_features", out_features), ("width", width),
                     ("depth", depth)):
            check_positive_int(n, v)
        self.depth = depth
        if depth == 1:
            super().__init__(atoms.Linear(in_features, out_features, manifold=manifold, role="mlp_in"))
            return
        first = atoms.Linear(in_features, width, manifold=manifold, role="mlp_in")
        last = atoms.Linear(width, out_features, manifold=manifold, role="mlp_out")
        layers = [first, activation(activation_fn)]
        hidden = depth - 2
        if hidden != 0:
            layers.append(repeat(activation(activation_fn) @ atoms.Linear(width, width, manifold=manifold,
                                                                           role="mlp_hidden"), hidden))
        layers.append(last)
        super().__init__(*layers)


class ResMLP(Compose):
    """ResMLP(in_features, out_features, width, depth): Linear(in→width), then ``depth`` residual
    blocks x ↦ (1−1/L)x + (1/L)·Linear(φ(Linear(RMSNorm(x)))), then Linear(width→out).
    Sensitivity stays O(1) in depth: 1 − 1/L + ν_φ/L per block, at most e^(ν_φ − 1) overall —
    on its domain: every block's RMSNorm sees inputs of RMS ≥ 1, which the construction does not
    guarantee (the residual stream shrinks, and with in > width a unit input can lie near the
    first Linear's null space; docs/algebra.md, "Tightness", has the measured values).
    ``claims.certify(net, x)`` says whether a batch is inside the domain and gives the constant that
    holds there."""

    def __init__(self, in_features, out_features, width, depth, activation_fn="gelu", manifold="euclidean"):
        for n, v in (("in_features", in_features), ("out_features", out_features), ("width", width),
                     ("depth", depth)):
            check_positive_int(n, v)
        self.depth = depth
        block = atoms.Linear(width, width, manifold=manifold, role="mlp_out") @ activation(activation_fn) \
            @ atoms.Linear(width, width, manifold=manifold, role="mlp_in") @ bonds.RMSNorm()
        super().__init__(
            atoms.Linear(in_features, width, manifold=manifold, role="mlp_in"),
            repeat(residual(block, depth), depth),
            atoms.Linear(width, out_features, manifold=manifold, role="head"),
        )
