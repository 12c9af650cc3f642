"""Boundary checks of what a module is called with: one clear TypeError/ValueError instead of an
AttributeError or IndexError from deep inside PyTorch. Shape-only (no host sync), so they cost
nothing on a GPU and do not break ``torch.compile`` graphs."""
from __future__ import annotations

import torch


def check_input(x, who: str, min_dim: int = 1, width=None):
    """Raise unless ``x`` is a tensor with at least ``min_dim`` dims (and last dim ``width`` if given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{who} expects a tensor with at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    if width is not None and x.shape[-1] != width:
        raise ValueError(f"{who} expects a last dimension of {width}, got shape {tuple(x.shape)}")
    return x
