"""One-hot encodings of token windows (the input of a character-level MLP)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..module import Bond


class NgramOneHot(Bond):
    """NgramOneHot(vocab_size, ngram): token ids (…, T) ↦ (…, T, ngram·vocab): at position t the
    one-hot codes of tokens t, t−1, …, t−ngram+1 (zeros before the start), scaled by √vocab so that
    every position has RMS ≤ 1 (= 1 once ngram tokens are present). Input is discrete: sensitivity 1
    by the ℓ1 → RMS convention of Embed."""

    def __init__(self, vocab_size: int, ngram: int):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("ngram", ngram)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"NgramOneHot: {name} must be a positive integer, got {v!r}")
        self.vocab_size, self.ngram = vocab_size, ngram
        self.out_dim = vocab_size * ngram

    def forward(self, idx):
        if idx.dtype.is_floating_point:
            raise TypeError(f"NgramOneHot expects integer token ids, got {idx.dtype}")
        codes = F.one_hot(idx, self.vocab_size).to(torch.get_default_dtype()) * math.sqrt(self.vocab_size)
        lags = [codes]
        for j in range(1, self.ngram):
            lags.append(F.pad(codes[..., :-j, :], (0, 0, j, 0)) if j < codes.shape[-2] else torch.zeros_like(codes))
        return torch.cat(lags, dim=-1)
