"""Claims that hold: adversarial measurement and runtime certification of the library's constants.

Two halves.

* **Measure** (float64, gradient ascent, several restarts): the largest ratio an adversary finds for

  - input sensitivity   ‖J_x f · Δx‖ / ‖Δx‖                     (:func:`measure_sensitivity`)
  - weight effect       ‖J_w f · Δw‖ / ‖Δw‖_M                   (:func:`measure_weight_gain`)
  - sharpness           ‖D²f[u, v]‖ / (‖u‖‖v‖) for xx, ww, wx   (:func:`measure_sharpness`)

  in the declared norms: max over tokens of the per-token RMS for activations, the modular norm for
  weights. Directions come from a power iteration in those norms (the dual map of the max-RMS norm
  is g_t ↦ g_t/RMS(g_t); of the modular norm ``module.dualize``), inputs from normalised gradient
  ascent on the unit-RMS sphere. Derivatives are central differences in float64 (every module
  supports them, including the Sinkhorn forward pass, which has no forward-mode rule).

* **Certify** (:func:`certify`, :func:`check_claims`): every declared constant holds on a stated
  domain — RMSNorm inputs of RMS ≥ 1, attention q, k, v of RMS ≤ 1, HC/mHC streams of unit RMS,
  atoms with natural norm ≤ 1 (Mix: row-stochastic, ≥ 0), inputs of Linear atoms of RMS ≤ 1.
  ``certify(model, x)`` runs the model once on x, records those statistics, says which conditions
  fail, and recomputes sensitivity, sharpness and weight gain with the *local* constants at x
  (RMSNorm 1/r, ‖W‖ for a Linear, the actual mixing coefficients of an HC layer, …). The local
  constants are true at every input of the batch, for the current weights; inside the domain they
  equal the declared ones. docs/algebra.md ("Certified domain") has the rules.

Example::

    from modula_mhc import claims, compounds
    net = compounds.ResMLP(64, 8, 32, 4).double()
    report = claims.check_claims(net, x)          # x: (batch, 64) float64
    report["in_domain"], report["violations"], report["claimed"], report["certified"], report["measured"]
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from . import atoms as _atoms
from .module import Atom, Module, static_constants

__all__ = ["seq_norm", "unit_rms", "measure_sensitivity", "measure_weight_gain", "measure_sharpness",
           "certify", "check_claims", "Certificate", "Measurement", "input_part"]

_FD = 1e-5      # central-difference step for first derivatives (float64)
_FD2 = 1e-4     # for second derivatives
_TOL = 1e-6     # slack of the domain conditions


# ----------------------------------------------------------------------------------------- norms
def seq_norm(y) -> torch.Tensor:
    """Max over tokens (all leading dims) of the per-token RMS over the last dim."""
    return y.pow(2).mean(dim=-1).sqrt().max()


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Every token rescaled to RMS 1 (a well-normed input)."""
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-300)


def _soft_norm(y, p=4.0) -> torch.Tensor:
    """(mean over tokens of RMS_t^p)^(1/p): the ascent objective. The max over tokens passes its
    gradient to one token only, which traps the ascent (a causal model's first token attends to
    itself alone); this smooth surrogate feeds every token, and the true max is what is reported."""
    return y.pow(2).mean(dim=-1).pow(p / 2).mean().pow(1 / p)


def _dual(g: torch.Tensor) -> torch.Tensor:
    """argmax ⟨g, d⟩ over ‖d‖ ≤ 1 in the max-over-tokens RMS norm: d_t = g_t / RMS(g_t)."""
    return g / g.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-300)


def _check_float(x, what):
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{what}: x must be a floating-point tensor (token ids: use claims.input_part(model, ids))")


# ----------------------------------------------------------------------------------------- results
@dataclass
class Measurement:
    """The largest ratio found, with the point and directions that produced it."""

    value: float
    x: torch.Tensor = None
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


# ----------------------------------------------------------------------------------------- sensitivity
def measure_sensitivity(f, x, restarts=3, steps=30, lr=0.1, move_input=True, seed=0) -> Measurement:
    """max ‖J_x f(x)·v‖ / ‖v‖ found by ascent (norms: max over tokens of per-token RMS).

    ``f``: a module or callable on float tensors; ``x``: a starting input (float64 recommended).
    Restart 0 starts at x, the others at x plus noise, all projected to unit RMS per token when
    ``move_input`` (else x stays fixed and only the direction is optimised). Each step: the
    direction takes a power-iteration step v ← dual(∇_v ‖J v‖), the input a normalised gradient step
    of size ``lr`` (decaying) back onto the unit-RMS sphere."""
    _check_float(x, "measure_sensitivity")
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


def _call(model, names, ws, x):
    return functional_call(model, dict(zip(names, ws)), (x,))


def _unit_dualized(model, grads):
    clean = [torch.nan_to_num(gr.detach(), nan=0.0, posinf=0.0, neginf=0.0) for gr in grads]
    return [d.detach() for d in model.dualize(clean, target_norm=1.0)]


def measure_weight_gain(model: Module, x, restarts=3, steps=15, seed=0) -> Measurement:
    """max ‖J_w f·Δw‖ / ‖Δw‖_M over directions Δw, at the current weights and input x (any input
    the model takes, token ids included). A power iteration in the modular norm:
    Δw ← dualize(∇_Δw ‖J_w f·Δw‖) (the steepest unit-norm direction, as the optimizer takes it)."""
    names, ws = _weights(model)
    g = torch.Generator().manual_seed(seed)
    best = Measurement(0.0)
    for _ in range(restarts):
        dw = _unit_dualized(model, [_randn(w.shape, g, w.dtype) for w in ws])
        run_best = 0.0
        for _ in range(steps):
            dr = [d.clone().requires_grad_(True) for d in dw]
            y = (_call(model, names, [w + _FD * d for w, d in zip(ws, dr)], x)
                 - _call(model, names, [w - _FD * d for w, d in zip(ws, dr)], x)) / (2 * _FD)
            out = _soft_norm(y)
            nrm = float(model.norm(dw))
            val = float(seq_norm(y.detach())) / nrm if nrm > 0 else 0.0
            run_best = max(run_best, val)
            if val > best.value:
                best = Measurement(val, None, (tuple(d.detach().clone() for d in dw),), best.per_restart)
            grads = torch.autograd.grad(out, dr, allow_unused=True)
            grads = [torch.zeros_like(d) if gr is None else gr for d, gr in zip(dr, grads)]
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
    if which == "gamma":
        _check_float(x, "measure_sharpness")
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
    if which not in ("alpha", "beta"):
        raise ValueError(f"which must be 'alpha', 'beta' or 'gamma', got {which!r}")
    model = f
    names, ws = _weights(model)
    g = torch.Generator().manual_seed(seed)
    h = _FD2
    best = Measurement(0.0)
    for _ in range(restarts):
        a = _unit_dualized(model, [_randn(w.shape, g, w.dtype) for w in ws])
        if which == "alpha":
            b = _unit_dualized(model, [_randn(w.shape, g, w.dtype) for w in ws])
        else:
            _check_float(x, "measure_sharpness(beta)")
            b = _dual(_randn(x.shape, g, x.dtype))
        run_best = 0.0
        for _ in range(steps):
            ar = [t.clone().requires_grad_(True) for t in a]
            if which == "alpha":
                br = [t.clone().requires_grad_(True) for t in b]
                def at(sa, sb):
                    return _call(model, names, [w + sa * h * p + sb * h * q for w, p, q in zip(ws, ar, br)], x)
                den = float(model.norm(a)) * float(model.norm(b))
            else:
                br = b.clone().requires_grad_(True)
                def at(sa, sb):
                    return _call(model, names, [w + sa * h * p for w, p in zip(ws, ar)], x + sb * h * br)
                den = float(model.norm(a)) * float(seq_norm(b))
            d2 = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / (4 * h * h)
            out = _soft_norm(d2)
            val = float(seq_norm(d2.detach())) / den if den > 0 else 0.0
            run_best = max(run_best, val)
            if val > best.value:
                best = Measurement(val, None, (a, b), best.per_restart)
            grads = torch.autograd.grad(out, ar + (br if which == "alpha" else [br]), allow_unused=True)
            grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(ar + (br if which == "alpha" else [br]), grads)]
            a = _unit_dualized(model, grads[:len(ar)])
            b = _unit_dualized(model, grads[len(ar):]) if which == "alpha" else _dual(grads[-1].detach())
        best.per_restart.append(run_best)
    return best


# ----------------------------------------------------------------------------------------- certify
def _rms_tokens(t):
    return t.detach().double().pow(2).mean(dim=-1).sqrt()


def _merge_stat(module, key, value, how):
    st = module.__dict__.setdefault("_local_stats", {})
    st[key] = value if key not in st else how(st[key], value)


def _linear_like(m):
    return isinstance(m, (_atoms.Linear, _atoms.Gain, _atoms.Conv2d, _atoms.Embed))


def _record_hooks(model):
    """Forward hooks that record, per module, the statistics its local constants need."""
    from .bonds import AttentionCore, RMSNorm
    from .compounds.hyper import HyperConnections
    handles = []

    def rmsnorm_hook(m, inp, out):
        _merge_stat(m, "min_rms", float(_rms_tokens(inp[0]).min()), min)

    def core_hook(m, inp, out):
        for name, t in zip("qkv", inp[0]):
            _merge_stat(m, f"max_rms_{name}", float(_rms_tokens(t).max()), max)

    def atom_hook(m, inp, out):
        x = inp[0]
        if torch.is_tensor(x) and x.is_floating_point() and not isinstance(m, _atoms.Conv2d):
            _merge_stat(m, "input_rms", float(_rms_tokens(x).max()), max)

    def hyper_hook(m, inp, out):
        x = inp[0]
        with torch.no_grad():
            h_pre, h_post, h_res = m.coefficients(x)
            from . import kernels
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
                _merge_stat(m, "gate_max", float(m.gate.weight.detach().abs().max()), max)
                _merge_stat(m, "phi_norm", float(m.phi.weight_norm()), max)

    for m in model.modules():
        if isinstance(m, RMSNorm):
            handles.append(m.register_forward_hook(rmsnorm_hook))
        elif isinstance(m, AttentionCore):
            handles.append(m.register_forward_hook(core_hook))
        elif isinstance(m, HyperConnections):
            handles.append(m.register_forward_hook(hyper_hook))
        elif isinstance(m, Atom) and _linear_like(m):
            handles.append(m.register_forward_hook(atom_hook))
    return handles


def _clear(model):
    for m in model.modules():
        m.__dict__.pop("_local_stats", None)


def _weight_violations(model) -> list:
    """Atoms outside the weights' domain: natural norm ≤ 1 (Mix: non-negative, unit row sums;
    mHC logits and biases: no condition, their constants hold for any value)."""
    from .atoms.mix import Mix, StaticCoefficients
    out = []
    names = {id(m): n for n, m in model.named_modules()}
    for a in model.atoms():
        if a.weight is None or isinstance(a, _atoms.Bias):
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
    from .bonds import AttentionCore, RMSNorm
    from .compounds.hyper import HyperConnections
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
        elif isinstance(m, Atom) and st.get("input_rms", 0) > 1 + _TOL:
            out.append(f"{name}: {type(m).__name__} input RMS {st['input_rms']:.4g} > 1")
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
            if _linear_like(a) and a.weight is not None:
                _merge_stat(a, "weight_norm", float(a.weight_norm().detach()), max)
        yield
    finally:
        for h in handles:
            h.remove()
        _clear(model)


def certify(model: Module, x) -> Certificate:
    """Run ``model`` on the batch ``x`` once and certify its constants there.

    Returns the declared constants (``claimed``), the domain conditions that fail
    (``violations``: RMSNorm inputs of RMS < 1, attention inputs of RMS > 1, HC streams not of unit
    RMS, atoms of natural norm > 1 or Mix weights off the row-stochastic set, Linear inputs of
    RMS > 1), and the constants recomputed with the local values at x (``certified``: true for
    every input of the batch at the current weights)."""
    with static_constants():
        claimed = _constants(model)
    with _recorded(model, x):
        violations = _input_violations(model) + _weight_violations(model)
        certified = _constants(model)
    return Certificate(not violations, violations, claimed, certified)


def input_part(model: Module, x):
    """(f, x_float): for a model that starts with an Embed atom (a GPT, token ids), the layers after
    it and the embedded input; otherwise (model, x)."""
    from .algebra import Compose
    if isinstance(model, Compose) and isinstance(model.layers[0], _atoms.Embed):
        with torch.no_grad():
            xe = model.layers[0](x)
        rest = list(model.layers[1:])
        return (rest[0] if len(rest) == 1 else Compose(*rest)), xe
    return model, x


def check_claims(model: Module, x, measure=True, restarts=3, steps=20, sharpness=False, seed=0) -> dict:
    """The runtime check: :func:`certify` at x, and (``measure=True``) adversarial measurements
    (input sensitivity of the part after any embedding, starting at x; weight gain at x; with
    ``sharpness=True`` also γ). ``ok`` is True when every measurement is ≤ its certified value.
    Input ascent moves x, so the certificate is re-evaluated at the worst input found."""
    cert = certify(model, x)
    report = cert.as_dict()
    if not measure:
        return report
    f, xf = input_part(model, x)
    sens = measure_sensitivity(f, xf, restarts=restarts, steps=steps, seed=seed)
    cert_at = certify(f, sens.x if sens.x is not None else xf)
    report["measured"] = dict(sensitivity=sens.value,
                              weight_gain=measure_weight_gain(model, x, restarts=restarts, seed=seed).value)
    report["certified_at_worst_input"] = cert_at.as_dict()
    ok = sens.value <= cert_at.certified["sensitivity"] * (1 + 1e-6) and \
        report["measured"]["weight_gain"] <= cert.certified["weight_gain"] * (1 + 1e-6)
    if sharpness:
        gam = measure_sharpness(f, xf, "gamma", restarts=restarts, steps=steps, seed=seed)
        report["measured"]["gamma"] = gam.value
        ok = ok and gam.value <= certify(f, gam.x if gam.x is not None else xf).certified["gamma"] * (1 + 1e-4)
    report["ok"] = ok
    return report
