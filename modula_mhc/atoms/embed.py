"""Embed atom: token ids → vectors (one-hot ℓ1 → RMS)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._free import FreeAtom


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

    def forward(self, idx):
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"Embed expects integer token ids, got {idx.dtype}")
        return F.embedding(idx, self.weight)

    @staticmethod
    def _row_rms(W):
        return W.float().pow(2).mean(dim=-1, keepdim=True).sqrt()

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return self._row_rms(W).max()

    def dualize_weight(self, G, target=1.0, state=None):
        rms = self._row_rms(G)
        return torch.where(rms > 0, G / rms.clamp_min(1e-30), torch.zeros_like(G)).to(G.dtype) * target
