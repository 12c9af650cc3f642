"""Multi-head self-attention as a compound."""
from __future__ import annotations

from .. import atoms, bonds
from .. import scalars as S
from ..algebra import Compose, Parallel, Scale
from ._util import check_positive_int


class Attention(Compose):
    """Attention(width, heads): W_o @ (1/3)·core @ (W_q, W_k, W_v), where core is softmax(τ q kᵀ/d)v
    (1/d scaling, causal, rotary). The 1/3 cancels the tuple's sensitivity 3, so the whole has the
    core's sensitivity max(√H, τH) for H heads (1 for one head), on inputs of RMS ≤ 1 with
    well-normed weights; its modular norm uses Modula's per-head constant max(1, τ) (weight_gain
    carries the difference). Mass 4 (one per Linear). Modula puts the 1/3 on q, k, v instead:
    temperature=1/9 reproduces it exactly (docs/algebra.md, "Deviations from Modula")."""

    def __init__(self, width, heads, causal=True, rope=True, manifold="euclidean", temperature=1.0):
        check_positive_int("width", width)
        check_positive_int("heads", heads)
        if not S.is_symbolic(width, heads) and width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        if rope and not S.is_symbolic(width, heads) and (width // heads) % 2:
            raise ValueError(f"rotary embedding needs an even head width, got {width}/{heads}")
        self.width, self.heads = width, heads
        qkv = Parallel(*(atoms.Linear(width, width, manifold=manifold, role=r) for r in ("attn_q", "attn_k", "attn_v")))
        third = S.fraction(1, 3, like=width)
        core = Scale(third, bonds.AttentionCore(heads, causal=causal, rope=rope, temperature=temperature))
        super().__init__(qkv, core, atoms.Linear(width, width, manifold=manifold, role="attn_o"))
        self.in_dim = self.out_dim = width
