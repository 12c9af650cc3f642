"""Hyper-connections (HC / mHC) around any ``nn.Module`` branch.

``hyper_connections(branch, streams=4, ...)`` wraps an existing sub-network F: (..., C) → (..., C)
— a module, a list of modules applied in turn, or any callable with the modules it uses — in
:class:`~modula_mhc.compounds.hyper.HyperConnections`, the library's own HC/mHC layer (nothing of
it is re-implemented here). The branch is adapted (:class:`~modula_mhc.adapt.hyper.HyperBranch`)
so its parameters get atom views and the whole layer trains with ``DualizeRetract``.

A pre-norm transformer block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` becomes an mHC block with

    attn = hyper_connections([blk.ln_1, blk.attn], streams=4)
    mlp = hyper_connections([blk.ln_2, blk.mlp], streams=4)
    x = mlp(attn(x))                      # x: (..., streams, C); expand_streams before, reduce_streams after
"""
from __future__ import annotations

from ..compounds.hyper import CollapseStreams, ExpandStreams, HyperConnections
from .hyper import HyperBranch

__all__ = ["expand_streams", "hyper_connections", "reduce_streams"]


def hyper_connections(branch, streams=4, width=None, call=None, constrained=True, manifolds="muon",
                      branch_sensitivity=1.0, **options) -> HyperConnections:
    """HC (``constrained=False``) or mHC (default) around an nn.Module branch; ``options`` go to
    :class:`~modula_mhc.compounds.hyper.HyperConnections` (dynamic, sinkhorn_iters, depth, …).
    Pass ``depth=`` the number of hyper-connected branches in the network (2 per transformer
    block) for the library's depth scaling (residual mix × (1 − 1/depth), branch × 1/depth), which
    keeps the modular norm's coefficients O(1) in depth; without it the layer computes the model's
    own ``x + F(x)`` and the coefficients grow by (1 + ν_F) per layer.
    Input and output are stream tensors (..., streams, C): use :func:`expand_streams` before the
    first wrapped branch and :func:`reduce_streams` after the last."""
    hb = HyperBranch(branch, width=width, call=call, manifolds=manifolds, sensitivity=branch_sensitivity)
    return HyperConnections(hb, streams=streams, constrained=constrained, width=hb.in_dim, **options)


def expand_streams(x, streams: int):
    """(..., C) → (..., streams, C), every stream a copy of x (``compounds.hyper.ExpandStreams``)."""
    return ExpandStreams(streams)(x)


def reduce_streams(x):
    """(..., n, C) → (..., C), the mean of the streams (``compounds.hyper.CollapseStreams``)."""
    return CollapseStreams(x.size(-2))(x)
