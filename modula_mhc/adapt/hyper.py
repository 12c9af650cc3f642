"""Hyper-connections (HC / mHC) around any ``nn.Module`` branch.

``hyper_connections(branch, streams=4, ...)`` wraps an existing sub-network F: (..., C) → (..., C)
— a module, a list of modules applied in turn, or any callable with the modules it uses — in
:class:`~modula_mhc.compounds.hyper.HyperConnections`, the library's own HC/mHC layer (nothing of
it is re-implemented here). The branch is adapted (:func:`modula_mhc.adapt`) so its parameters get
atom views and the whole layer trains with ``DualizeRetract``.

A pre-norm transformer block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` becomes an mHC block with

    attn = hyper_connections([blk.ln_1, blk.attn], streams=4)
    mlp = hyper_connections([blk.ln_2, blk.mlp], streams=4)
    x = mlp(attn(x))                      # x: (..., streams, C); expand_streams before, reduce_streams after
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..compounds.hyper import CollapseStreams, ExpandStreams, HyperConnections
from ..module import Module, Sharpness
from .roles import hf_conv1d_type, is_norm_module

__all__ = ["HyperBranch", "expand_streams", "hyper_connections", "infer_width", "reduce_streams"]


def infer_width(module: nn.Module) -> int | None:
    """The feature width C a branch reads: the first norm layer's size, else the first Linear's
    in_features (HF Conv1D: weight.shape[0]; Conv: in_channels); None if nothing says."""
    conv1d = hf_conv1d_type()
    for m in module.modules():
        if is_norm_module(m):
            w = getattr(m, "weight", None)
            shape = getattr(m, "normalized_shape", None)
            if shape:
                return int(shape[-1])
            if w is not None and w.ndim == 1:
                return int(w.shape[0])
            nf = getattr(m, "num_features", None)
            if isinstance(nf, int):
                return nf
        if isinstance(m, nn.Linear):
            return m.in_features
        if conv1d is not None and isinstance(m, conv1d):
            return int(m.weight.shape[0])
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return None


def _first(out):
    """Hugging Face sub-modules return tuples (hidden, attn weights, …): keep the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


class HyperBranch(Module):
    """HyperBranch(branch, width=None, call=None, manifolds="muon", sensitivity=1.0): an nn.Module
    branch F: (..., C) → (..., C) as a modula_mhc Module for ``HyperConnections``.

    ``branch``: a module, or a list of modules applied in turn (tuple outputs reduced to their
    first element). ``call``: a callable u ↦ F(u) used instead of running ``branch`` (it closes
    over the modules it needs; ``branch`` then only says whose parameters train).
    ``sensitivity``: the branch's assumed input Lipschitz constant (default 1, as a pre-norm branch
    at well-normed weights; ``HyperConnections`` derives its bounds from it). Its parameters are
    adapted with :func:`modula_mhc.adapt` (``manifolds`` as there)."""

    preserves_dim = True

    def __init__(self, branch, width=None, call: Callable | None = None, manifolds="muon", sensitivity=1.0,
                 **adapt_options):
        super().__init__()
        from .adapted import adapt
        if isinstance(branch, (list, tuple)):
            branch = nn.ModuleList(branch)
        if not isinstance(branch, nn.Module):
            raise TypeError(f"HyperBranch: branch must be an nn.Module or a list of them, got {type(branch).__name__}")
        if call is not None and not callable(call):
            raise TypeError("HyperBranch: call must be a callable u -> F(u)")
        width = width if width is not None else infer_width(branch)
        if width is None:
            raise ValueError("HyperBranch: cannot infer the branch width; pass width=C")
        self.in_dim = self.out_dim = int(width)
        self._sensitivity = float(sensitivity)
        self.call = call
        adapt_options.setdefault("structure", "branch")
        self.adapted = adapt(branch, manifolds, **adapt_options) if any(True for _ in branch.parameters()) else None
        if self.adapted is None:
            self.branch = branch

    @property
    def module(self):
        return self.adapted.model if self.adapted is not None else self.branch

    def forward(self, u):
        if self.call is not None:
            return _first(self.call(u))
        m = self.module
        if isinstance(m, nn.ModuleList):
            for sub in m:
                u = _first(sub(u))
            return u
        return _first(m(u))

    def atoms(self):
        return self.adapted.atoms() if self.adapted is not None else []

    @property
    def mass(self):
        return self.adapted.mass if self.adapted is not None else 0.0

    @property
    def sensitivity(self):
        return self._sensitivity

    @property
    def sharpness(self):
        return Sharpness(float("inf"), float("inf"), float("inf"))

    def _coefficient_map(self):
        return self.adapted._coefficient_map() if self.adapted is not None else {}


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
