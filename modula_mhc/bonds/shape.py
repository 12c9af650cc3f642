"""Shape bonds: flatten, mean, head split/merge, concatenation and sums of tuples."""
from __future__ import annotations

import torch

from .. import scalars as S
from ..module import Bond


class Flatten(Bond):
    """(B, …) ↦ (B, prod …). RMS of the whole ≤ max of the parts: sensitivity 1, linear."""

    def forward(self, x):
        return x.flatten(start_dim=1)


class Mean(Bond):
    """Mean over a dimension (default the token dim −2): a convex combination, sensitivity 1."""

    def __init__(self, dim: int = -2):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(dim=self.dim)


class SplitHeads(Bond):
    """(…, T, H·d) ↦ (…, H, T, d). Norm convention: per-head RMS (Modula's); see docs/algebra.md."""

    def __init__(self, heads: int):
        super().__init__()
        if not S.is_symbolic(heads) and (int(heads) != heads or heads < 1):
            raise ValueError(f"heads must be a positive integer, got {heads}")
        self.heads = heads

    def forward(self, x):
        *lead, T, W = x.shape
        if W % self.heads:
            raise ValueError(f"width {W} is not divisible by heads {self.heads}")
        return x.reshape(*lead, T, self.heads, W // self.heads).transpose(-3, -2)


class MergeHeads(Bond):
    """(…, H, T, d) ↦ (…, T, H·d). RMS of the concatenation ≤ max over heads: sensitivity 1."""

    def forward(self, x):
        *lead, H, T, d = x.shape
        return x.transpose(-3, -2).reshape(*lead, T, H * d)


def _known(dims):
    return [d for d in dims if d is not None and S.is_number(d)]


class Concat(Bond):
    """(a, b, …) ↦ concatenation along the last dim; ‖concat‖_RMS ≤ Σ‖·‖_RMS: sensitivity 1."""

    def bind_input_dims(self, dims):
        if dims and len(_known(dims)) == len(dims):
            self.out_dim = sum(dims)

    def forward(self, xs):
        return torch.cat(tuple(xs), dim=-1)


class Add(Bond):
    """(a, b, …) ↦ a + b + …; ‖Σ‖ ≤ Σ‖·‖: sensitivity 1 in the tuple (sum) norm."""

    def bind_input_dims(self, dims):
        known = _known(dims)
        if len(set(known)) > 1:
            raise ValueError(f"Add: cannot add a tuple of outputs with widths {tuple(dims)}")
        if known:
            self.out_dim = known[0]

    def forward(self, xs):
        out = None
        for x in xs:
            out = x if out is None else out + x
        return out
