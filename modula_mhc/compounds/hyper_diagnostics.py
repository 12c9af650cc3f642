"""Stability diagnostics of hyper-connected networks: gains of H_res per layer and across layers.

Forward gain of a mixing matrix H: max_i Σ_j |H_ij| (its ℓ∞→ℓ∞ norm: how much a signal can grow
going forward through the residual mix); backward gain: max_j Σ_i |H_ij| (the same for gradients
going back). The composite matrix after layer l is H^(l) ⋯ H^(1) per token; mHC keeps both of its
gains near 1 at any depth, unconstrained HC lets them drift (the mHC paper reports ~3000 for HC).
"""
from __future__ import annotations

import contextlib

import torch

from ..claims import certify as certify_claims
from .hyper import HyperConnections

__all__ = ["stability_report"]


def _gains(H: torch.Tensor):
    """(forward, backward) gains per matrix of a batch (N, n, n)."""
    a = H.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def stability_report(model, batch=None, tokens=(2, 64), seed=0, certify=True) -> dict:
    """Per-layer and composite forward/backward gains of H_res over every HyperConnections layer of
    ``model`` (in execution order).

    ``batch``: the model's input (token ids for a GPT, a stream tensor for a stack of layers). With
    ``batch=None`` a model with ``vocab_size``/``context`` (a GPT) gets random tokens of shape
    ``tokens`` (T capped at the context); any other model is measured on its static parts alone.
    Gains are maxima over the tokens of the batch (per-token matrices; static ones are shared).
    Returns a dict: ``layers`` (per layer: forward_gain, backward_gain, their means over tokens,
    marginal_error of the Sinkhorn reached (mHC, dynamic), kind), ``composite_forward_gain`` and
    ``composite_backward_gain`` (lists over depth: gains of H^(l)⋯H^(1)), the final composite
    gains, ``max_marginal_error`` and ``source``. H_res is reported without the depth factor
    ρ = 1 − 1/L (listed per layer as residual_scale).

    With a batch (or random tokens) and ``certify=True``, ``certificate`` holds
    ``modula_mhc.claims.certify(model, batch).as_dict()``: whether the batch and the current weights
    are inside the domain of the declared constants, the conditions that fail, and the constants
    that hold there (one more forward pass). None for the static-parameters report.
    """
    layers = [m for m in model.modules() if isinstance(m, HyperConnections)]
    if not layers:
        raise ValueError("stability_report: the model has no HyperConnections layer")
    source = "batch"
    if batch is None and hasattr(model, "vocab_size") and hasattr(model, "context"):
        g = torch.Generator().manual_seed(seed)
        B, T = tokens
        batch = torch.randint(0, model.vocab_size, (B, min(T, model.context)), generator=g)
        source = "random tokens"
    matrices, errors = [], []
    if batch is None:
        source = "static parameters"
        for layer in layers:
            H, err = layer.static_residual(return_error=True)
            matrices.append(H.reshape(1, layer.streams, layer.streams))
            errors.append(err)
    else:
        with contextlib.ExitStack() as stack, torch.no_grad():
            records = [stack.enter_context(layer.recording()) for layer in layers]
            model(batch)
        for layer, rec in zip(layers, records):
            if "h_res" not in rec:
                raise RuntimeError("stability_report: a HyperConnections layer did not run on this batch")
            matrices.append(rec["h_res"].double().reshape(-1, layer.streams, layer.streams))
            errors.append(rec.get("marginal_error"))
    per_layer, comp_fwd, comp_bwd = [], [], []
    composite = None
    for layer, H, err in zip(layers, matrices, errors):
        fwd, bwd = _gains(H)
        per_layer.append(dict(kind="mHC" if layer.constrained else "HC", dynamic=layer.dynamic,
                              forward_gain=float(fwd.max()), backward_gain=float(bwd.max()),
                              forward_gain_mean=float(fwd.mean()), backward_gain_mean=float(bwd.mean()),
                              marginal_error=err, residual_scale=layer.residual_scale))
        if composite is not None and composite.shape[0] != H.shape[0] and 1 not in (composite.shape[0], H.shape[0]):
            raise ValueError("stability_report: layers saw different numbers of tokens; cannot compose")
        composite = H if composite is None else H @ composite
        cf, cb = _gains(composite)
        comp_fwd.append(float(cf.max()))
        comp_bwd.append(float(cb.max()))
    errs = [e for e in errors if e is not None]
    certificate = None
    if certify and batch is not None:
        certificate = certify_claims(model, batch).as_dict()
    return dict(source=source, certificate=certificate, layers=per_layer, composite_forward_gain=comp_fwd, composite_backward_gain=comp_bwd,
                final_composite_forward_gain=comp_fwd[-1], final_composite_backward_gain=comp_bwd[-1],
                max_marginal_error=max(errs) if errs else None)
