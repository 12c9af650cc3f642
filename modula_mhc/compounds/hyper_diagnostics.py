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
from ..module import Module
from .hyper import HyperConnections

__all__ = ["stability_report"]


def _gains(H: torch.Tensor):
    """(forward, backward) gains per matrix of a batch (N, n, n)."""
    a = H.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def _run_recorded(model, batch, layers) -> list:
    """[(layer, H_res, marginal error)] for every call of a HyperConnections layer while ``model``
    runs ``batch``, in call order: registration order need not be execution order, and a layer used
    twice is two factors of the composite."""
    calls: list = []
    with contextlib.ExitStack() as stack, torch.no_grad():
        records = {id(layer): stack.enter_context(layer.recording()) for layer in layers}

        def hook(layer, inp, out):  # runs after the layer's forward has filled its record
            rec = records[id(layer)]
            calls.append((layer, rec["h_res"], rec.get("marginal_error")))

        for layer in layers:
            stack.callback(layer.register_forward_hook(hook).remove)
        model(batch)
    ran = {id(layer) for layer, _, _ in calls}
    if any(id(layer) not in ran for layer in layers):
        raise RuntimeError("stability_report: a HyperConnections layer did not run on this batch")
    return calls


def stability_report(model, batch=None, tokens=(2, 64), seed=0, certify=True) -> dict:
    """Per-layer and composite forward/backward gains of H_res over every call of a HyperConnections
    layer of ``model``, in execution order (registration order without a batch).

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
    that hold there (one more forward pass). None for the static-parameters report and for a model
    that is not a modula_mhc Module (a plain ``nn.Module`` declares no constants to certify).
    A layer called k times appears k times in ``layers`` and is k factors of the composite.
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
    if batch is None:
        source = "static parameters"
        calls = [(layer, *layer.static_residual(return_error=True)) for layer in layers]
    else:
        calls = _run_recorded(model, batch, layers)
    layers = [layer for layer, _, _ in calls]
    matrices = [H.double().reshape(-1, layer.streams, layer.streams) for layer, H, _ in calls]
    errors = [err for _, _, err in calls]
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
    if certify and batch is not None and isinstance(model, Module):  # certify reads modula_mhc constants
        certificate = certify_claims(model, batch).as_dict()
    return dict(source=source, certificate=certificate, layers=per_layer, composite_forward_gain=comp_fwd, composite_backward_gain=comp_bwd,
                final_composite_forward_gain=comp_fwd[-1], final_composite_backward_gain=comp_bwd[-1],
                max_marginal_error=max(errs) if errs else None)
