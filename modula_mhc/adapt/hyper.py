"""The branch of a hyper-connection: any ``nn.Module`` F: (..., C) → (..., C) as a modula_mhc Module.

:class:`HyperBranch` adapts the branch (:func:`modula_mhc.adapt`) so its parameters get atom views
and :class:`~modula_mhc.compounds.hyper.HyperConnections` can wrap it; that layer builds one
itself when given a plain ``nn.Module``. :mod:`modula_mhc.adapt.connections` wraps branches in
HC/mHC layers (this file does not import the compounds, which import it).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ..module import Module, Sharpness
from .adapted import adapt
from .roles import hf_conv1d_type, is_norm_module

__all__ = ["HyperBranch", "infer_width"]


def _width_source(module: nn.Module):
    """(C, the layer it was read from): the first norm layer's size, else the first Linear's
    in_features (HF Conv1D: weight.shape[0]; Conv: in_channels); (None, None) if nothing says."""
    conv1d = hf_conv1d_type()
    for m in module.modules():
        if is_norm_module(m):
            w = getattr(m, "weight", None)
            shape = getattr(m, "normalized_shape", None)
            if shape:
                return int(shape[-1]), m
            if w is not None and w.ndim == 1:
                return int(w.shape[0]), m
            nf = getattr(m, "num_features", None)
            if isinstance(nf, int):
                return nf, m
        if isinstance(m, nn.Linear):
            return m.in_features, m
        if conv1d is not None and isinstance(m, conv1d):
            return int(m.weight.shape[0]), m
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels, m
    return None, None


def infer_width(module: nn.Module) -> int | None:
    """The feature width C a branch reads: the first norm layer's size, else the first Linear's
    in_features (HF Conv1D: weight.shape[0]; Conv: in_channels); None if nothing says."""
    return _width_source(module)[0]


# layers that read (N, C, *spatial) with the channels at dim 1, never at the last dim: a branch that
# starts with one cannot take the (..., C) rows of a stream tensor directly (for H = W = C it would
# run without error on the wrong axis)
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _check_layout(branch: nn.Module, call):
    """(the inferred width, the layer it came from); ValueError when the branch is channels-first and
    no ``call`` adapts it."""
    width, source = _width_source(branch)
    if call is None and isinstance(source, _CHANNELS_FIRST):
        raise ValueError(f"HyperBranch: the branch starts with {type(source).__name__}, which reads channels "
                         "first, but stream tensors keep C last (..., n, C); pass call=lambda u: "
                         "branch(u.movedim(-1, 1)).movedim(1, -1)")
    return width, source


def _per_token_norm(m) -> bool:
    """A norm over each token's features (LayerNorm, RMSNorm, look-alikes): F(c·u) = F(u) for c > 0.
    Batch, instance and group norms normalise across tokens or channel groups instead."""
    batchwise = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
    return m is not None and is_norm_module(m) and not isinstance(m, batchwise)


def _first(out):
    """Hugging Face sub-modules return tuples (hidden, attn weights, …): keep the hidden states."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise TypeError("HyperBranch: the branch returned an empty tuple; it must return a tensor (..., C)")
        return out[0]
    return out


def _check_number(name: str, value) -> float:
    """A finite number ≥ 0 (a negative or NaN constant would turn every bound built on it negative)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"HyperBranch: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class HyperBranch(Module):
    """HyperBranch(branch, width=None, call=None, manifolds="muon", sensitivity=1.0): an nn.Module
    branch F: (..., C) → (..., C) as a modula_mhc Module for ``HyperConnections``.

    ``branch``: a module, or a list of modules applied in turn (tuple outputs reduced to their
    first element). ``call``: a callable u ↦ F(u) used instead of running ``branch`` (it closes
    over the modules it needs; ``branch`` then only says whose parameters train).
    ``sensitivity``: the branch's assumed input Lipschitz constant at unit-RMS input (default 1, as
    a pre-norm branch at well-normed weights; finite, ≥ 0; ``HyperConnections`` derives its bounds
    from it). ``scale_invariant`` is True when the width is read off a per-token norm (LayerNorm,
    RMSNorm): then ‖JF(u)‖ ≤ ν_F/RMS(u), which ``claims.certify`` uses at inputs with RMS(u) < 1.
    A branch whose first layer reads channels first (Conv, BatchNorm2d, …) needs a ``call`` that
    moves the channels last; F must return a tensor (..., C). Its parameters are adapted with
    :func:`modula_mhc.adapt` (``manifolds`` as there)."""

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
        inferred, source = _check_layout(branch, call)
        # a pre-norm branch (the width read off a per-token norm) is scale-invariant, so its declared ν_F
        # (at unit-RMS input) becomes ν_F/RMS(u) at smaller u: claims.certify uses that (hyper_bounds)
        self.scale_invariant = _per_token_norm(source)
        width = width if width is not None else inferred
        if width is None:
            raise ValueError("HyperBranch: cannot infer the branch width; pass width=C")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width != int(width) or width < 1:
            raise ValueError(f"HyperBranch: width must be a positive integer, got {width!r}")
        self.in_dim = self.out_dim = int(width)
        self._sensitivity = _check_number("sensitivity", sensitivity)
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
