"""Adversarial measurement of the declared constants (float64, gradient ascent, restarts).

The largest ratio an adversary finds for the input sensitivity ‖J_x f·Δx‖/‖Δx‖, the weight
effect ‖J_w f·Δw‖/‖Δw‖_M and the sharpness ‖D²f[u, v]‖/(‖u‖‖v‖), in the declared norms.
Directions come from a power iteration in those norms, inputs from normalised gradient ascent on
the unit-RMS sphere; derivatives are central differences, always in float64 (a float32 or
bfloat16 model is measured on a float64 copy). A Conv2d feature map (…, C, H, W) is measured in
its own norm, the per-pixel RMS over channels (max over pixels): the estimators see it with the
channels moved last.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from ..algebra import Compose, Identity, Scale, _Branches
from ..atoms.conv2d import Conv2d
from ..bonds.activations import _Elementwise
from ..module import Module
from ._checks import check_measurement
from .norms import _FD, _FD2, _dual, _soft_norm, seq_norm, unit_rms

__all__ = ["Measurement", "measure_sensitivity", "measure_weight_gain", "measure_sharpness"]


@dataclass
class Measurement:
    """The largest ratio found, with the point and directions that produced it."""

    value: float
    x: torch.Tensor | None = None
    directions: tuple = ()
    per_restart: list = field(default_factory=list)

    def __float__(self):
        return float(self.value)


def _restart_inputs(x, restarts, seed, move_input):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(restarts):
        if r == 0 or not move_input:
            out.append(x.detach().clone())
        else:
            out.append(unit_rms(x.detach() + torch.randn(x.shape, generator=g, dtype=x.dtype)))
    return out, g


def _randn(shape, g, dtype):
    return torch.randn(shape, generator=g, dtype=dtype)


def _float64(f, x):
    """(f, x) in float64: central differences with steps of 1e-5 need it (in bfloat16 every
    difference rounded to 0 and the ratio measured 0; in float32 the rounding error of 1e-2 put
    the ratio above the true constant). A Module of another precision is copied, not converted."""
    if isinstance(f, Module) and any(t.is_floating_point() and t.dtype != torch.float64
                                     for t in [*f.parameters(), *f.buffers()]):
        f = copy.deepcopy(f).double()
    if torch.is_tensor(x) and x.is_floating_point():
        x = x.double()
    return f, x


def _layout_free(m) -> bool:
    """Modules that act entry by entry, so the layout of their input is that of their output."""
    return isinstance(m, (_Elementwise, Identity)) or (isinstance(m, Scale) and _layout_free(m.module))


def _feature_map(m, side: int) -> bool:
    """True when m's input (side 0) or output (side −1) is a Conv2d feature map (…, C, H, W), whose
    norm is the per-pixel RMS over the channels (dim −3) rather than the RMS over the last dim."""
    if isinstance(m, Conv2d):
        return True
    if isinstance(m, Scale):
        return _feature_map(m.module, side)
    if isinstance(m, _Branches):
        return any(_feature_map(b, side) for b in m.branches)
    if isinstance(m, Compose):
        layers = list(m.layers) if side == 0 else list(m.layers)[::-1]
        return next((_feature_map(layer, side) for layer in layers if not _layout_free(layer)), False)
    return False


def _last(t, moved):
    """Channels (dim −3) moved last, so that the last-dim norms of ``norms`` are the per-pixel norm."""
    return t.movedim(-3, -1) if moved else t


def _back(t, moved):
    return t.movedim(-1, -3) if moved else t


def _prepared(f, x, who, restarts, steps, float_x=True):
    """Checked arguments in float64 and the layout the norms act on: (f, x, ins, outs) where ins/outs
    say that the input/output is a feature map (then ``x`` is returned with its channels last)."""
    check_measurement(who, f, x, restarts, steps, float_x=float_x)
    f, x = _float64(f, x)
    with torch.no_grad():
        out = f(x)
    if not torch.is_tensor(out):  # a Parallel's tuple: the norms here measure one tensor
        raise TypeError(f"{who}: the model returns {type(out).__name__}, not a tensor; measure each output's "
                        "module on its own (e.g. the branches of a Parallel)")
    ins = float_x and _feature_map(f, 0) and x.ndim >= 3
    return f, _last(x, ins), ins, _feature_map(f, -1)


def _channels_last(f, ins, outs):
    """f on channels-last input and output (the identity wrapper when neither is a feature map)."""
    if not (ins or outs):
        return f
    return lambda z: _last(f(_back(z, ins)), outs)


# ----------------------------------------------------------------------------------------- sensitivity
def measure_sensitivity(f, x, restarts=3, steps=30, lr=0.1, move_input=True, seed=0) -> Measurement:
    """max ‖J_x f(x)·v‖ / ‖v‖ found by ascent (norms: max over tokens of per-token RMS).

    ``f``: a module or callable on float tensors; ``x``: a starting input (float64 recommended).
    Restart 0 starts at x, the others at x plus noise, all projected to unit RMS per token when
    ``move_input`` (else x stays fixed and only the direction is optimised). Each step: the
    direction takes a power-iteration step v ← dual(∇_v ‖J v‖), the input a normalised gradient step
    of size ``lr`` (decaying) back onto the unit-RMS sphere."""
    f, x, ins, outs = _prepared(f, x, "measure_sensitivity", restarts, steps)
    best = _measure_sensitivity(_channels_last(f, ins, outs), x, restarts, steps, lr, move_input, seed)
    return _restored(best, ins)


def _restored(best, ins):
    """The measurement's input and input directions back in the model's layout."""
    if ins:
        best.x = None if best.x is None else _back(best.x, True)
        best.directions = tuple(_back(d, True) for d in best.directions)
    return best


def _measure_sensitivity(f, x, restarts, steps, lr, move_input, seed):
    best = Measurement(0.0)
    xs, g = _restart_inputs(x, restarts, seed, move_input)
    for x0 in xs:
        xc = x0.clone()
        v = _dual(_randn(x.shape, g, x.dtype))
        run_best = 0.0
        for k in range(steps):
            xr = xc.clone().requires_grad_(move_input)
            vr = v.clone().requires_grad_(True)
            jv = (f(xr + _FD * vr) - f(xr - _FD * vr)) / (2 * _FD)
            ratio = _soft_norm(jv) / seq_norm(vr)
            val = float(seq_norm(jv.detach()) / seq_norm(v))
            if val > run_best:
                run_best = val
            if val > best.value:
                best = Measurement(val, xc.detach().clone(), (v.detach().clone(),), best.per_restart)
            wrt = [xr, vr] if move_input else [vr]
            grads = [torch.zeros_like(t) if gr is None else torch.nan_to_num(gr.detach(), nan=0.0, posinf=0.0, neginf=0.0)
                     for t, gr in zip(wrt, torch.autograd.grad(ratio, wrt, allow_unused=True))]
            v = _dual(grads[-1])
            if not torch.isfinite(v).all() or float(seq_norm(v)) == 0:  # a flat spot: start the direction afresh
                v = _dual(_randn(x.shape, g, x.dtype))
            if move_input:
                gx = grads[0].detach()
                step = lr * (1 - k / steps) * _dual(gx)
                xc = unit_rms(xc + step)
        best.per_restart.append(run_best)
    return best


# ----------------------------------------------------------------------------------------- weights
def _weights(model):
    names = [n for n, _ in model.named_parameters()]
    ws = [p.detach() for p in model.parameters()]
    if len(ws) != len(model.atoms()):
        raise ValueError("measure: every parameter must belong to an atom (aligned with module.atoms())")
    return names, ws


def _caller(model, names, ins=False, outs=False):
    """(ws, x) ↦ the model's output at weights ws, in the measured layout (see ``_channels_last``)."""
    def call(ws, x):
        return _last(functional_call(model, dict(zip(names, ws)), (_back(x, ins),)), outs)
    return call


def _step(base, ws, dirs) -> float:
    """Finite-difference step for the weight direction ``dirs``: base·max(1, max|w|)/max|Δw|, so
    that the perturbation h·Δw is ``base`` relative to the weights. A unit-modular-norm Δw can have
    entries of 1e24 (an atom behind a 1e-6 scale has coefficient 1e-25), and the fixed step then
    measured the cubic terms of a multilinear chain (κ 5e19 against a true 1/4); or of 1e-12 (behind
    a 1e12 scale), and w ± h·Δw rounded to w."""
    size = max((float(d.abs().max()) for d in dirs if d.numel()), default=0.0)
    if not size > 0:
        return base
    return base * max([1.0] + [float(w.abs().max()) for w in ws if w.numel()]) / size


def _unit_dualized(model, grads):
    clean = [torch.nan_to_num(gr.detach(), nan=0.0, posinf=0.0, neginf=0.0) for gr in grads]
    return [d.detach() for d in model.dualize(clean, target_norm=1.0)]


def measure_weight_gain(model: Module, x, restarts=3, steps=15, seed=0) -> Measurement:
    """max ‖J_w f·Δw‖ / ‖Δw‖_M over directions Δw, at the current weights and input x (any input
    the model takes, token ids included). A power iteration in the modular norm:
    Δw ← dualize(∇_Δw ‖J_w f·Δw‖) (the steepest unit-norm direction, as the optimizer takes it)."""
    model, x, _, outs = _prepared(model, x, "measure_weight_gain", restarts, steps, float_x=False)
    names, ws = _weights(model)
    call = _caller(model, names, outs=outs)
    g = torch.Generator().manual_seed(seed)
    best = Measurement(0.0)
    for _ in range(restarts):
        dw = _unit_dualized(model, [_randn(w.shape, g, w.dtype) for w in ws])
        run_best = 0.0
        for _ in range(steps):
            dr = [d.clone().requires_grad_(True) for d in dw]
            h = _step(_FD, ws, dw)
            y = (call([w + h * d for w, d in zip(ws, dr)], x) - call([w - h * d for w, d in zip(ws, dr)], x)) / (2 * h)
            out = _soft_norm(y)
            nrm = float(model.norm(dw))
            val = float(seq_norm(y.detach())) / nrm if nrm > 0 else 0.0
            run_best = max(run_best, val)
            if val > best.value:
                best = Measurement(val, None, (tuple(d.detach().clone() for d in dw),), best.per_restart)
            raw = torch.autograd.grad(out, dr, allow_unused=True)
            grads = [torch.zeros_like(d) if gr is None else gr for d, gr in zip(dr, raw)]
            dw = _unit_dualized(model, grads)
        best.per_restart.append(run_best)
    return best


# ----------------------------------------------------------------------------------------- sharpness
def _second_input(f, x, u, v):
    h = _FD2
    return (f(x + h * u + h * v) - f(x + h * u - h * v) - f(x - h * u + h * v) + f(x - h * u - h * v)) / (4 * h * h)


def measure_sharpness(f, x, which="gamma", restarts=2, steps=15, lr=0.1, move_input=True, seed=0) -> Measurement:
    """Second derivatives, maximised like :func:`measure_sensitivity`:

    * ``"gamma"``: ‖D²_xx f[u, v]‖/(‖u‖‖v‖) (``f`` any callable, x float);
    * ``"alpha"``: ‖D²_ww f[Δw, Δw']‖/(‖Δw‖_M‖Δw'‖_M) and ``"beta"``: ‖D²_wx f[Δw, Δx]‖/(‖Δw‖_M‖Δx‖)
      (``f`` a Module at its current weights; alternating power steps in the modular norm)."""
    if which not in ("alpha", "beta", "gamma"):
        raise ValueError(f"which must be 'alpha', 'beta' or 'gamma', got {which!r}")
    f, x, ins, outs = _prepared(f, x, f"measure_sharpness({which})", restarts, steps, float_x=which != "alpha")
    if which == "gamma":
        return _restored(_measure_gamma(_channels_last(f, ins, outs), x, restarts, steps, lr, move_input, seed), ins)
    best = _measure_weight_sharpness(f, x, which, restarts, steps, seed, ins, outs)
    if ins:  # β's input direction back in the model's layout
        best.directions = (best.directions[0], _back(best.directions[1], True)) if best.directions else ()
    return best


def _measure_gamma(f, x, restarts, steps, lr, move_input, seed):
    best = Measurement(0.0)
    xs, g = _restart_inputs(x, restarts, seed, move_input)
    for x0 in xs:
        xc, run_best = x0.clone(), 0.0
        u, v = _dual(_randn(x.shape, g, x.dtype)), _dual(_randn(x.shape, g, x.dtype))
        for k in range(steps):
            xr = xc.clone().requires_grad_(move_input)
            ur, vr = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
            d2 = _second_input(f, xr, ur, vr)
            ratio = _soft_norm(d2) / (seq_norm(ur) * seq_norm(vr))
            val = float(seq_norm(d2.detach()) / (seq_norm(u) * seq_norm(v)))
            run_best = max(run_best, val)
            if val > best.value:
                best = Measurement(val, xc.detach().clone(), (u.clone(), v.clone()), best.per_restart)
            wrt = ([xr] if move_input else []) + [ur, vr]
            grads = [torch.zeros_like(t) if gr is None else torch.nan_to_num(gr.detach(), nan=0.0, posinf=0.0,
                                                                              neginf=0.0)
                     for t, gr in zip(wrt, torch.autograd.grad(ratio, wrt, allow_unused=True))]
            u, v = _dual(grads[-2]), _dual(grads[-1])
            if move_input:
                xc = unit_rms(xc + lr * (1 - k / steps) * _dual(grads[0].detach()))
        best.per_restart.append(run_best)
    return best


def _measure_weight_sharpness(model, x, which, restarts, steps, seed, ins, outs):
    """α (two weight directions) or β (a weight and an input direction) at fixed x."""
    names, ws = _weights(model)
    call = _caller(model, names, ins, outs)
    g = torch.Generator().manual_seed(seed)
    best = Measurement(0.0)
    for _ in range(restarts):
        a = _unit_dualized(model, [_randn(w.shape, g, w.dtype) for w in ws])
        if which == "alpha":
            b = _unit_dualized(model, [_randn(w.shape, g, w.dtype) for w in ws])
        else:
            b = _dual(_randn(x.shape, g, x.dtype))
        run_best = 0.0
        for _ in range(steps):
            ar = [t.clone().requires_grad_(True) for t in a]
            ha = _step(_FD2, ws, a)  # each direction its own step (see _step)
            if which == "alpha":
                br = [t.clone().requires_grad_(True) for t in b]
                hb = _step(_FD2, ws, b)
                def at(sa, sb):
                    return call([w + sa * ha * p + sb * hb * q for w, p, q in zip(ws, ar, br)], x)
                den = float(model.norm(a)) * float(model.norm(b))
            else:
                br = b.clone().requires_grad_(True)
                hb = _FD2
                def at(sa, sb):
                    return call([w + sa * ha * p for w, p in zip(ws, ar)], x + sb * hb * br)
                den = float(model.norm(a)) * float(seq_norm(b))
            d2 = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / (4 * ha * hb)
            out = _soft_norm(d2)
            val = float(seq_norm(d2.detach())) / den if den > 0 else 0.0
            run_best = max(run_best, val)
            if val > best.value:
                best = Measurement(val, None, (a, b), best.per_restart)
            wrt = ar + (br if which == "alpha" else [br])
            raw = torch.autograd.grad(out, wrt, allow_unused=True)
            grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(wrt, raw)]
            a = _unit_dualized(model, grads[:len(ar)])
            b = _unit_dualized(model, grads[len(ar):]) if which == "alpha" else _dual(grads[-1].detach())
        best.per_restart.append(run_best)
    return best
