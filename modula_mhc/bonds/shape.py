"""Shape bonds: flatten, mean, head split/merge, concatenation and sums of tuples."""
from __future__ import annotations

import torch

from .. import scalars as S
from .._inputs import check_input
from ..module import Bond


class Flatten(Bond):
    """(B, …) ↦ (B, prod …). RMS of the whole ≤ max of the parts: sensitivity 1, linear."""

    def forward(self, x):
        check_input(x, "Flatten", min_dim=2)
        return x.flatten(start_dim=1)


class Mean(Bond):
    """Mean over a dimension (default the token dim −2): a convex combination, sensitivity 1."""

    def __init__(self, dim: int = -2):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"Mean: dim must be an int, got {dim!r}")
        self.dim = dim

    def forward(self, x):
        check_input(x, f"Mean(dim={self.dim})", min_dim=self.dim + 1 if self.dim >= 0 else -self.dim)
        return x.mean(dim=self.dim)


class SplitHeads(Bond):
    """(…, T, H·d) ↦ (…, H, T, d). Norm on the output: per-head rows (Modula's convention), the max
    over heads and tokens of the RMS over d, which is what ``claims`` measures on a (…, H, T, d)
    tensor. A token change that lies in one head has a per-head RMS √H times its full-width RMS, so
    the sensitivity is √H (MergeHeads, the way back, is 1); see docs/algebra.md."""

    def __init__(self, heads: int):
        super().__init__()
        if not S.is_symbolic(heads) and not (S.is_number(heads) and int(heads) == heads and heads >= 1):
            raise ValueError(f"heads must be a positive integer, got {heads!r}")
        self.heads = heads

    @property
    def sensitivity(self):
        return S.sqrt(self.heads)

    def forward(self, x):
        check_input(x, f"SplitHeads({self.heads})", min_dim=2)
        *lead, T, W = x.shape
        if W % self.heads:
            raise ValueError(f"width {W} is not divisible by heads {self.heads}")
        return x.reshape(*lead, T, self.heads, W // self.heads).transpose(-3, -2)


class MergeHeads(Bond):
    """(…, H, T, d) ↦ (…, T, H·d). RMS of the concatenation ≤ max over heads: sensitivity 1."""

    def forward(self, x):
        check_input(x, "MergeHeads", min_dim=3)
        *lead, H, T, d = x.shape
        return x.transpose(-3, -2).reshape(*lead, T, H * d)


def _tensors(xs, who, min_dim=0):
    """The tuple of tensors a merging bond is called with (TypeError/ValueError otherwise)."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (tuple, list)) or not xs:
        raise TypeError(f"{who} expects a non-empty tuple of tensors (the outputs of parallel branches), "
                        f"got {type(xs).__name__}")
    return tuple(check_input(x, who, min_dim=min_dim) for x in xs)


def _known(dims):
    return [d for d in dims if d is not None and S.is_number(d)]


class Concat(Bond):
    """(a, b, …) ↦ concatenation along the last dim; ‖concat‖_RMS ≤ Σ‖·‖_RMS: sensitivity 1."""

    def bind_input_dims(self, dims):
        if dims and len(_known(dims)) == len(dims):
            self.out_dim = sum(dims)

    def forward(self, xs):
        return torch.cat(_tensors(xs, "Concat", min_dim=1), dim=-1)


class Add(Bond):
    """(a, b, …) ↦ a + b + …; ‖Σ‖ ≤ Σ‖·‖: sensitivity 1 in the tuple (sum) norm.

    The parts must have one shape: widths known when the network is composed are checked then,
    the others when it runs (no silent broadcasting of a width-1 branch)."""

    def bind_input_dims(self, dims):
        known = _known(dims)
        if len(set(known)) > 1:
            raise ValueError(f"Add: cannot add a tuple of outputs with widths {tuple(dims)}")
        if known:
            self.out_dim = known[0]

    def forward(self, xs):
        xs = _tensors(xs, "Add")
        if any(x.shape != xs[0].shape for x in xs[1:]):
            raise ValueError(f"Add: cannot add outputs of different shapes {[tuple(x.shape) for x in xs]} "
                             f"(it does not broadcast: give every branch the same width)")
        out = None
        for x in xs:
            out = x if out is None else out + x
        return out
