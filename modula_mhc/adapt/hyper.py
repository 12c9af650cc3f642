"""The branch of a hyper-connection: any ``nn.Module`` F: (..., C) → (..., C) as a modula_mhc Module.

:class:`HyperBranch` adapts the branch (:func:`modula_mhc.adapt`) so its parameters get atom views
and :class:`~modula_mhc.compounds.hyper.HyperConnections` can wrap it; that layer builds one
itself when given a plain ``nn.Module``. :mod:`modula_mhc.adapt.connections` wraps branches in
HC/mHC layers (this file does not import the compounds, which import it).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..module import Module, Sharpness
from .adapted import adapt
from .roles import hf_conv1d_type, is_norm_module

__all__ = ["HyperBranch", "infer_width"]


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

    @property
    def weight_gain(self):
        """∞: how far a step of a foreign branch's weights moves its output is not derived (its norm
        layers and cores are not certified), whatever ``sensitivity`` is assumed."""
        return float("inf")

    def _coefficient_map(self):
        return self.adapted._coefficient_map() if self.adapted is not None else {}
