"""Attention pieces: rotary embedding, causal mask, softmax and the fused attention core.

Norm convention for token sequences: the max over tokens of the per-token RMS over the full
width H·d. With H heads and q, k, v of per-token RMS ≤ 1, the attention core softmax(τ q kᵀ/d) v
with 1/d (not 1/√d) scaling has sensitivity max(√H, τH) in the tuple norm ‖q‖+‖k‖+‖v‖: the value
path is a convex combination per head (√H when every head attends to a different token), the q
and k paths are covariances Cov_p(v, ⟨Δq, k⟩/d) bounded by Cauchy–Schwarz, H when every head's
k and v are concentrated on that head (docs/algebra.md). H = 1 gives Modula's 1. γ = 6·H^(5/2)·max(1, τ)².
The modular norm keeps Modula's per-head convention (``norm_sensitivity`` max(1, τ)), so the
step sizes do not depend on the number of heads; ``weight_gain`` reports the difference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import scalars as S
from ..module import Bond, Sharpness


def _check_rope_width(d, who):
    """An odd width has an unpaired coordinate: the halves would not line up, and the "rotation"
    would change the width and norm (or fail with a broadcasting error) instead of rotating."""
    if d % 2:
        raise ValueError(f"{who}: rotary embedding needs an even (head) width, got {d}")


def rope_tables(T: int, d: int, base: float, device, dtype):
    """cos/sin tables (T, d/2) for angles θ_{t,i} = t · base^(−2i/d); d must be even."""
    _check_rope_width(d, "rope_tables")
    inv = base ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x1_i, x2_i) (first and second half of the last dim) by θ:
    (x1 cos θ − x2 sin θ, x1 sin θ + x2 cos θ). The last dim must be even."""
    _check_rope_width(x.shape[-1], "apply_rope")
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def attention_reference(q, k, v, causal: bool, scale: float):
    """softmax(scale·q kᵀ + causal mask) v, written out (supports every autograd mode)."""
    scores = scale * (q @ k.transpose(-2, -1))
    if causal:
        T, Sk = scores.shape[-2:]
        mask = torch.ones(T, Sk, dtype=torch.bool, device=q.device).triu(diagonal=Sk - T + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class Rope(Bond):
    """Rotary position embedding on (…, T, d): a rotation per token (norm-preserving, linear):
    sensitivity 1, sharpness 0. ⟨Rope(q)_m, Rope(k)_n⟩ depends only on m − n."""

    preserves_dim = True

    def __init__(self, base: float = 10000.0):
        super().__init__()
        self.base = base

    def forward(self, x):
        T, d = x.shape[-2], x.shape[-1]
        _check_rope_width(d, "Rope")
        cos, sin = rope_tables(T, d, self.base, x.device, x.dtype)
        return apply_rope(x, cos, sin)


class CausalMask(Bond):
    """Scores (…, T, S) ↦ scores with entries above the diagonal set to −∞ (a coordinate
    projection on the finite entries: sensitivity 1, linear)."""

    preserves_dim = True

    def forward(self, scores):
        T, Sk = scores.shape[-2:]
        mask = torch.ones(T, Sk, dtype=torch.bool, device=scores.device).triu(diagonal=Sk - T + 1)
        return scores.masked_fill(mask, float("-inf"))


class Softmax(Bond):
    """softmax(scale·x) over the last dim. ‖diag(p) − ppᵀ‖₂ ≤ 1/2, so sensitivity |scale|/2;
    second derivative p⊙(h−h̄)⊙(k−k̄) − p·Cov_p(h,k) is ≤ 5‖h‖₂‖k‖₂, i.e. γ = 5·scale²·√n in RMS
    norms over n entries (∞ until the width n is bound)."""

    preserves_dim = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return torch.softmax(self.scale * x, dim=-1)

    @property
    def sensitivity(self):
        return S.absolute(self.scale) / 2

    @property
    def sharpness(self):
        if self.in_dim is None:
            return Sharpness(0.0, 0.0, S.infinity())
        return Sharpness(0.0, 0.0, 5 * self.scale ** 2 * S.sqrt(self.in_dim))


class AttentionCore(Bond):
    """(q, k, v) ↦ softmax(τ·q kᵀ / d + mask) v per head, heads merged; q, k, v are (…, T, H·d).

    τ/d scaling (d = head width, temperature τ = 1 by default), optional causal mask and rotary
    embedding of q and k (``rope=True`` needs an even head width d: a ValueError when the width is
    bound by composition, else at the first call). In the tuple norm ‖q‖+‖k‖+‖v‖ (per-token RMS
    over the full width H·d) the sensitivity is max(√H, τH) and γ = 6·H^(5/2)·max(1, τ)² (module
    docstring; H = τ = 1 gives Modula's 1 and 6); ``norm_sensitivity`` is the per-head max(1, τ)."""

    def __init__(self, heads: int, causal: bool = True, rope: bool = True, rope_base: float = 10000.0,
                 temperature: float = 1.0):
        super().__init__()
        if not S.is_symbolic(heads) and (int(heads) != heads or heads < 1):
            raise ValueError(f"heads must be a positive integer, got {heads}")
        if not S.is_symbolic(temperature) and not (S.is_number(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.heads, self.causal, self.rope, self.rope_base = heads, causal, rope, rope_base
        self.temperature = temperature

    def bind_input_dims(self, dims):
        """Check the (q, k, v) widths when a composition fixes them (e.g. after three Linears)."""
        if dims and all(d is not None and S.is_number(d) for d in dims):
            for W in dims:
                self._head_width(W)

    def _head_width(self, W):
        H = self.heads
        if S.is_symbolic(H):
            return W // H
        if W % H:
            raise ValueError(f"AttentionCore: width {W} is not divisible by heads {H}")
        if self.rope and (W // H) % 2:
            raise ValueError(f"AttentionCore: rotary embedding needs an even head width, got {W}/{H} = {W // H} "
                             f"(use rope=False or another width or number of heads)")
        return W // H

    def _input_scale(self, which="qkv"):
        """max(1, largest per-token RMS of the named inputs) seen under ``claims.certify`` (1 otherwise)."""
        st = self.local_stats()
        if st is None:
            return 1.0
        return max([1.0] + [st.get(f"max_rms_{c}", 1.0) for c in which])

    @property
    def sensitivity(self):
        """max(√H, τ·H·s_v·max(s_q, s_k)) with s = max(1, RMS of q, k, v): the value path is ≤ √H, the
        q and k paths ≤ τ·H·‖k‖·‖v‖ and τ·H·‖q‖·‖v‖ (declared domain: s = 1)."""
        H, tau = self.heads, self.temperature
        return S.maximum(S.sqrt(H), tau * H * self._input_scale("v") * self._input_scale("qk"))

    @property
    def norm_sensitivity(self):
        """Modula's per-head convention max(1, τ) (the step sizes do not depend on H)."""
        return S.maximum(1.0, self.temperature)

    @property
    def sharpness(self):
        H, s = self.heads, self._input_scale()
        return Sharpness(0.0, 0.0, 6.0 * H ** S.fraction(5, 2, like=H) * S.maximum(1.0, self.temperature) ** 2 * s ** 3)

    def forward(self, qkv):
        q, k, v = qkv
        *lead, T, W = q.shape
        H = self.heads
        d = self._head_width(W)
        q, k, v = (t.reshape(*lead, T, H, d).transpose(-3, -2) for t in (q, k, v))
        if self.rope:
            cos, sin = rope_tables(T, d, self.rope_base, q.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        try:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=float(self.temperature) / d)
        except NotImplementedError:  # fused kernels lack forward-mode AD (jvp) on some backends
            o = attention_reference(q, k, v, self.causal, float(self.temperature) / d)
        return o.transpose(-3, -2).reshape(*lead, T, W)
