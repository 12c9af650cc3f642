"""What a user would otherwise train: plain PyTorch models in standard parametrisation.

Standard parametrisation (SP) here means torch's default initialisation (nn.Linear: uniform with
variance 1/(3·fan_in); nn.Embedding: N(0, 1)), no width- or depth-dependent multipliers, and
residual blocks x + f(x). These are the models the AdamW baselines train.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SPMLP(nn.Sequential):
    """depth Linear layers with GELU between them (depth = number of Linear layers), no bias."""

    def __init__(self, in_features, out_features, width, depth):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        layers = []
        for i in range(depth):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
        super().__init__(*layers)


class SPBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); softmax(qkᵀ/√d_head)."""

    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, mlp_ratio * width, bias=False)
        self.out = nn.Linear(mlp_ratio * width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class SPGPT(nn.Module):
    """nanoGPT-style character model: token + learned position embeddings, depth pre-norm blocks,
    final LayerNorm, Linear head (untied). Input token ids (B, T), output logits (B, T, vocab)."""

    def __init__(self, vocab_size, context, width, depth, heads, mlp_ratio=4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(SPBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.ln = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, idx):
        T = idx.shape[-1]
        if T > self.context:
            raise ValueError(f"SPGPT(context={self.context}) got a sequence of length {T}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def adamw(model, lr):
    """AdamW as nanoGPT sets it up: betas (0.9, 0.95), weight decay 0.01 (torch's default)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
