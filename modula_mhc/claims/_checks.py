"""Argument checks of the claims entry points, run once at the boundary: a clear error instead of a
silent wrong answer (NaN compares False, so a NaN input looked in-domain and measured 0, and zero
restarts or steps measured 0)."""
from __future__ import annotations

import numbers

import torch
from torch import nn


def check_float(x, who):
    """TypeError unless x is a floating-point tensor."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating-point tensor (token ids: use claims.input_part(model, ids))")


def check_finite(who, model, x):
    """ValueError naming the argument when x (a tensor or a tuple of them) or a weight of ``model``
    (when it is an nn.Module) has a NaN or inf entry. Token ids (integer x) are always finite."""
    for t in x if isinstance(x, (tuple, list)) else (x,):
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{who}: x has non-finite entries (NaN or inf)")
    if isinstance(model, nn.Module):
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise ValueError(f"{who}: weight {name!r} has non-finite entries (NaN or inf)")


def check_counts(who, **counts):
    """ValueError unless every given count (restarts, steps) is a positive int."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")


def check_measurement(who, model, x, restarts, steps, float_x=True):
    """The checks every measurement starts with: x a float tensor (unless ``float_x`` is False: the
    weight measurements take token ids too), x and the weights finite, positive restarts and steps."""
    if float_x:
        check_float(x, who)
    check_finite(who, model, x)
    check_counts(who, restarts=restarts, steps=steps)
