"""Runtime certification: the declared constants hold on a stated domain; off it, local ones.

``certify(model, x)`` runs the model once on x, records the statistics each module's local
constants need (forward hooks), lists the domain conditions that fail and recomputes the
constants with the local values (docs/algebra.md, "Certified domain").
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..algebra import Compose
from ..atoms._free import MaxAbsAtom
from ..atoms.bias import Bias
from ..atoms.conv2d import Conv2d
from ..atoms.embed import Embed
from ..atoms.gain import Gain
from ..atoms.linear import Linear
from ..atoms.mix import Gate, Mix, StaticCoefficients
from ..bonds.attention import AttentionCore
from ..bonds.norms import RMSNorm
from ..compounds.hyper import HyperConnections
from ..module import Atom, Module, static_constants
from ._checks import check_finite

__all__ = ["Certificate", "certify", "input_part"]

_TOL = 1e-6     # slack of the domain conditions


def _rms_tokens(t):
    return t.detach().double().pow(2).mean(dim=-1).sqrt()


def _merge_stat(module, key, value, how):
    st = module.__dict__.setdefault("_local_stats", {})
    st[key] = value if key not in st else how(st[key], value)


def _certified_atom(m):
    """Atoms whose local constants read their weight's norm (sensitivity) and input size (weight
    gain), as ``Atom.sensitivity`` / ``Atom.weight_gain`` do."""
    return isinstance(m, (Linear, Gain, Conv2d, Embed, Mix, Gate))


def _input_size(m, x) -> float:
    """Largest size of x in the norm m's weight-effect bound ‖ΔW x‖ ≤ ‖ΔW‖‖x‖ takes: per-pixel RMS
    over channels for Conv2d (a k×k patch of such pixels has RMS ≤ their max), per-token RMS over
    the last dim otherwise (Mix: per stream, Gate: per coefficient vector)."""
    if isinstance(m, Conv2d):
        return float(x.detach().double().pow(2).mean(dim=-3).sqrt().max())
    return float(_rms_tokens(x).max())


def _operator_norm(a) -> float:
    """The norm a's sensitivity bound acts with. Mix: ‖W‖_{∞→∞} (max absolute row sum, the stream
    norm's operator norm), not the Birkhoff norm, which also counts columns and so exceeds 1 at
    row-stochastic weights. Gain, Gate: max|w| exactly (their weight_norm rounds to
    float32). Others: the natural norm."""
    W = a.weight.detach()
    if isinstance(a, Mix):
        return float(W.double().abs().sum(-1).max())
    if isinstance(a, MaxAbsAtom):
        return float(W.double().abs().max())
    return float(a.weight_norm().detach())


def _record_hooks(model):
    """Forward hooks that record, per module, the statistics its local constants need."""
    handles = []

    def rmsnorm_hook(m, inp, out):
        _merge_stat(m, "min_rms", float(_rms_tokens(inp[0]).min()), min)

    def core_hook(m, inp, out):
        for name, t in zip("qkv", inp[0]):
            _merge_stat(m, f"max_rms_{name}", float(_rms_tokens(t).max()), max)

    def atom_hook(m, inp, out):
        x = inp[0]
        if torch.is_tensor(x) and x.is_floating_point():
            _merge_stat(m, "input_rms", _input_size(m, x), max)

    def hyper_hook(m, inp, out):
        x = inp[0]
        with torch.no_grad():
            h_pre, h_post, h_res = m.coefficients(x)
            u = kernels.mhc_pre(x, h_pre.to(x.dtype))
            fu = m.branch(u)
            n, C = m.streams, m.width
            flat = x.reshape(*x.shape[:-2], n * C)
            _merge_stat(m, "stream_max", float(_rms_tokens(x).max()), max)
            _merge_stat(m, "flat_min", float(_rms_tokens(flat).min()), min)
            _merge_stat(m, "pre_l1", float(h_pre.abs().sum(-1).max()), max)
            _merge_stat(m, "post_max", float(h_post.abs().max()), max)
            _merge_stat(m, "res_rows", float(h_res.abs().sum(-1).max()), max)
            _merge_stat(m, "f_max", float(_rms_tokens(fu).max()), max)
            ru = _rms_tokens(u)
            _merge_stat(m, "u_min", float(ru.min()), min)
            ratio = torch.where(ru > 0, h_pre.abs().sum(-1).double() / ru.clamp_min(1e-300), math.inf)
            _merge_stat(m, "u_ratio", float(ratio.max()), max)
            if m.dynamic:
                # the same norms a standalone Gate / Linear certifies with (compounds/hyper_bounds.py)
                _merge_stat(m, "gate_max", _operator_norm(m.gate), max)
                _merge_stat(m, "phi_norm", _operator_norm(m.phi), max)

    for m in model.modules():
        if isinstance(m, RMSNorm):
            handles.append(m.register_forward_hook(rmsnorm_hook))
        elif isinstance(m, AttentionCore):
            handles.append(m.register_forward_hook(core_hook))
        elif isinstance(m, HyperConnections):
            handles.append(m.register_forward_hook(hyper_hook))
        elif isinstance(m, Atom) and _certified_atom(m):
            handles.append(m.register_forward_hook(atom_hook))
    return handles


def _clear(model):
    for m in model.modules():
        m.__dict__.pop("_local_stats", None)


def _weight_violations(model) -> list:
    """Atoms outside the weights' domain: natural norm ≤ 1 (Mix: non-negative, unit row sums;
    mHC logits and biases: no condition, their constants hold for any value)."""
    out = []
    names = {id(m): n for n, m in model.named_modules()}
    for a in model.atoms():
        if a.weight is None or isinstance(a, Bias):
            continue
        name = names.get(id(a), type(a).__name__)
        W = a.weight.detach().double()
        if isinstance(a, Mix):
            err = max(float((W.sum(-1) - 1).abs().max()), float((-W).clamp_min(0).max()))
            if err > _TOL:
                out.append(f"{name}: Mix weight is not row-stochastic and non-negative (error {err:.3g})")
            continue
        if isinstance(a, StaticCoefficients) and a.norm_kind == "rms":
            continue
        nrm = float(a.weight_norm().detach())
        if nrm > 1 + _TOL:
            out.append(f"{name}: {type(a).__name__} natural norm {nrm:.4g} > 1")
    return out


def _input_violations(model) -> list:
    out = []
    for name, m in model.named_modules():
        st = m.__dict__.get("_local_stats")
        if not st:
            continue
        if isinstance(m, RMSNorm) and st["min_rms"] < 1 - _TOL:
            out.append(f"{name}: RMSNorm input RMS {st['min_rms']:.4g} < 1")
        elif isinstance(m, AttentionCore) and max(st[f"max_rms_{c}"] for c in "qkv") > 1 + _TOL:
            big = ", ".join(f"{c} {st[f'max_rms_{c}']:.4g}" for c in "qkv")
            out.append(f"{name}: attention input RMS > 1 ({big})")
        elif isinstance(m, HyperConnections):
            if st["stream_max"] > 1 + _TOL or st["flat_min"] < 1 - _TOL:
                out.append(f"{name}: HC streams not unit-RMS (max stream RMS {st['stream_max']:.4g}, "
                           f"RMS of the flattened stream {st['flat_min']:.4g})")
            # a foreign pre-norm branch (HyperBranch.scale_invariant) reads u through its own norm,
            # whose input RMS no module of ours records: the HC layer's u_min stands in for it, as a
            # native branch's RMSNorm does for itself
            if getattr(m.branch, "scale_invariant", False) and st["u_min"] < 1 - _TOL:
                out.append(f"{name}: pre-norm branch input RMS {st['u_min']:.4g} < 1 (streams cancel in u = h_preᵀx)")
        elif isinstance(m, Atom) and st.get("input_rms", 0) > 1 + _TOL:
            what = "per-pixel input RMS" if isinstance(m, Conv2d) else "input RMS"
            out.append(f"{name}: {type(m).__name__} {what} {st['input_rms']:.4g} > 1")
    return out


@dataclass
class Certificate:
    """Declared constants, the domain conditions that fail at a batch, and the local constants
    that hold there (equal to the declared ones when ``in_domain``)."""

    in_domain: bool
    violations: list
    claimed: dict
    certified: dict

    def as_dict(self):
        return dict(in_domain=self.in_domain, violations=list(self.violations), claimed=dict(self.claimed),
                    certified=dict(self.certified))


def _constants(model) -> dict:
    a, b, g = (float(v) for v in model.sharpness)
    return dict(sensitivity=float(model.sensitivity), weight_gain=float(model.weight_gain), alpha=a, beta=b, gamma=g)


@contextlib.contextmanager
def _recorded(model, x):
    _clear(model)
    handles = _record_hooks(model)
    try:
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        handles = []
        for a in model.atoms():
            if _certified_atom(a) and a.weight is not None:
                _merge_stat(a, "weight_norm", _operator_norm(a), max)
        yield
    finally:
        for h in handles:
            h.remove()
        _clear(model)


def certify(model: Module, x) -> Certificate:
    """Run ``model`` on the batch ``x`` once and certify its constants there.

    Returns the declared constants (``claimed``), the domain conditions that fail
    (``violations``: RMSNorm inputs of RMS < 1, attention inputs of RMS > 1, HC streams not of unit
    RMS, atoms of natural norm > 1 or Mix weights off the row-stochastic set, inputs of RMS > 1 to
    Linear, Gain, Mix and Gate atoms and of per-pixel RMS > 1 to Conv2d), and the constants
    recomputed with the local values at x (``certified``: true for every input of the batch at the
    current weights). Raises ValueError when x or a weight has a NaN or inf entry."""
    check_finite("certify", model, x)
    with static_constants():
        claimed = _constants(model)
    with _recorded(model, x):
        violations = _input_violations(model) + _weight_violations(model)
        certified = _constants(model)
    return Certificate(not violations, violations, claimed, certified)


def input_part(model: Module, x):
    """(f, x_float): for a model that starts with an Embed atom (a GPT, token ids), the layers after
    it and the embedded input; otherwise (model, x)."""
    if isinstance(model, Compose) and isinstance(model.layers[0], Embed):
        with torch.no_grad():
            xe = model.layers[0](x)
        rest = list(model.layers[1:])
        return (rest[0] if len(rest) == 1 else Compose(*rest)), xe
    return model, x
