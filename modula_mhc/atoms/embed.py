"""Embed atom: token ids → vectors (one-hot ℓ1 → RMS)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._inputs import check_input
from ._free import FreeAtom, row_rms_dual


class Embed(FreeAtom):
    """Embed(vocab_size, width): y = W[idx], W stored (vocab, width) like nn.Embedding.

    Natural norm max over tokens of the RMS of its vector (the ℓ1→RMS operator norm);
    dualize: every token's gradient row normalised to RMS t (zero rows stay zero).
    Init: each row random with RMS 1. Sensitivity 1, sharpness (0, 1, 0)."""

    def __init__(self, vocab_size, width, mass=1.0, role="embed"):
        super().__init__((vocab_size, width), manifold="euclidean", mass=mass, role=role)
        self.vocab_size, self.width = vocab_size, width
        self.in_dim, self.out_dim = None, width

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is None:
            return
        w = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
        w = w / w.pow(2).mean(dim=1, keepdim=True).sqrt()
        self.weight.copy_(w.to(self.weight))
        self._tag()

    def _repr_dims(self):
        return f"{self.vocab_size}, {self.width}"

    def forward(self, idx):
        check_input(idx, f"Embed({self.vocab_size}, {self.width})", min_dim=0)
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"Embed expects integer token ids, got {idx.dtype}")
        try:
            return F.embedding(idx, self.weight)
        except IndexError:  # CPU only (CUDA asserts on the device); checking first would cost a sync
            raise ValueError(f"Embed(vocab_size={self.vocab_size}) got token ids outside [0, {self.vocab_size}): "
                             f"min {int(idx.min())}, max {int(idx.max())}") from None

    @staticmethod
    def _row_rms(W):
        return W.float().pow(2).mean(dim=-1, keepdim=True).sqrt()

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return self._row_rms(W).max()

    def dualize_weight(self, G, target=1.0, state=None):
        return row_rms_dual(G, target)
