"""Hyper-connections: n residual streams mixed around a branch — HC (Zhu et al. 2024) and mHC
(manifold-constrained, DeepSeek 2025) — as a compound with modular metadata.

A stream tensor has shape (..., n, C). One HyperConnections layer around a branch F: C → C is

    x_{l+1} = ρ · H_res x_l + β · H_postᵀ F(H_pre x_l),        out_i = ρ Σ_j H_res[i, j] x_j + β h_post_i F(u)

with u = Σ_j h_pre_j x_j, ρ = 1 − 1/L and β = 1/L for ``depth=L`` (ρ = β = 1 without ``depth``).
Orientation: H_res[i, j] weights input stream j in output stream i (see :mod:`modula_mhc.kernels`).
Coefficients (fp32, fp64 for fp64 inputs), from the flattened n·C stream of each token:
x̃ = x_flat / RMS(x_flat), z = x̃ φ, H̃ = α ⊙ z + b  (mHC) or  H̃ = α ⊙ tanh(z) + b  (HC), then
mHC: H_pre = σ(H̃_pre), H_post = 2σ(H̃_post), H_res = Sinkhorn(exp(H̃_res)) (last half-step
normalises rows, so H_res is exactly row-stochastic); HC: H_pre, H_post, H_res = H̃ directly.
The stream norm is the max over streams and tokens of the RMS over C. The sensitivity bound and
its derivation are in docs/mhc.md.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import atoms, kernels
from .. import scalars as S
from ..atoms.mix import Gate, Mix, StaticCoefficients
from ..module import Bond, Module, Sharpness, static_constants
from ._util import is_count, is_positive_integer
from .hyper_bounds import sensitivity_constants

__all__ = ["HyperConnections", "ExpandStreams", "CollapseStreams", "residual_init_logit"]

_EPS = 1e-6  # inside the RMS of the flattened stream, as in bonds.RMSNorm


def _coeff_dtype(x: torch.Tensor) -> torch.dtype:
    """The coefficient path's dtype: fp32, fp64 for fp64 streams."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def residual_init_logit(streams: int, diagonal: float) -> float:
    """τ with Sinkhorn(exp(τ I)) having diagonal e^τ/(e^τ + n − 1) = ``diagonal`` (0 for n = 1)."""
    if streams == 1:
        return 0.0
    if not 0.0 < diagonal < 1.0:
        raise ValueError(f"res_init_diagonal must lie in (0, 1), got {diagonal}")
    return math.log(diagonal * (streams - 1) / (1.0 - diagonal))


def _as_module(branch, width):
    """A modula_mhc Module as it is; any other torch.nn.Module adapted (atom views on its parameters)."""
    if isinstance(branch, Module):
        return branch
    if not isinstance(branch, torch.nn.Module):
        raise TypeError(f"HyperConnections wraps a Module (modula_mhc or torch.nn), got {type(branch).__name__}")
    # imported here, not at the top: modula_mhc.adapt's package imports this module (adapt.connections)
    from ..adapt.hyper import HyperBranch
    return HyperBranch(branch, width=width)


def _check_options(branch, streams, width, depth, iters, sinkhorn_tol, coeff_mass, norm_at) -> int:
    """Validate the constructor's options (iters: sinkhorn_iters, sinkhorn_max_iters); returns the width C."""
    if norm_at not in ("init", "bound"):
        raise ValueError(f"norm_at must be 'init' or 'bound', got {norm_at!r}")
    if not is_count(streams):
        raise ValueError(f"streams must be a positive int, got {streams!r}")
    width = width if width is not None else branch.in_dim
    if width is None or S.is_symbolic(width) or not S.is_number(width) or int(width) != width or width < 1:
        raise ValueError(f"HyperConnections needs the branch width: pass width=C (branch.in_dim is {branch.in_dim!r})")
    width = int(width)
    out = branch.out_dim if branch.out_dim is not None else (width if branch.preserves_dim else None)
    if out is not None and S.is_number(out) and out != width:
        raise ValueError(f"the branch must map width {width} to itself, it maps to {out}")
    if depth is not None and not is_positive_integer(depth):
        raise ValueError(f"depth must be a positive integer or None, got {depth!r}")
    for name, v in zip(("sinkhorn_iters", "sinkhorn_max_iters"), iters):
        if not is_count(v):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if sinkhorn_tol is not None and not (isinstance(sinkhorn_tol, (int, float)) and sinkhorn_tol > 0):
        raise ValueError(f"sinkhorn_tol must be a positive number or None, got {sinkhorn_tol!r}")
    if not (isinstance(coeff_mass, (int, float)) and coeff_mass > 0):
        raise ValueError(f"coeff_mass must be a positive number, got {coeff_mass!r}")
    return width


def _check_bound(b):
    """M_F: None (then ν_F) or a finite number ≥ 0 (a negative one made the claimed sensitivity negative)."""
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0):
        raise ValueError(f"branch_output_bound must be a finite number >= 0 or None, got {b!r}")
    return b


def _branch_output(branch, u: torch.Tensor, width: int) -> torch.Tensor:
    """F(u), checked: a tensor whose last dim is C. Other dims may broadcast against u (a
    pooled (B, 1, C)), but a last dim of 1 (or a scalar) would spread one number over all C features."""
    f = branch(u)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"HyperConnections: the branch returned {type(f).__name__}, not a tensor (..., {width}); "
                        "give a call= that returns the hidden states")
    if f.ndim == 0 or f.size(-1) != width:
        raise ValueError(f"HyperConnections: the branch maps width {width} to shape {tuple(f.shape)}; "
                         f"a hyper-connection branch maps (..., {width}) to (..., {width})")
    return f


def _static_init(n: int, constrained: bool, use_mix: bool, res_init_diagonal: float) -> list:
    """The static coefficients b = (b_pre, b_post[, b_res]) at init (see HyperConnections)."""
    if not constrained:
        return [1.0 / n] * n + [1.0] * n + torch.eye(n, dtype=torch.float64).flatten().tolist()
    tau = residual_init_logit(n, res_init_diagonal)
    # σ(b_pre) = 1/n; n = 1 would need b_pre = +∞ and uses h_pre = 1 instead (_coefficients_from), b_pre unused
    init = [-math.log(n - 1) if n > 1 else 0.0] * n + [0.0] * n
    if use_mix and n > 1:  # static mHC: h_pre = (1.5 − i/(n−1))/n, Σ = 1 (same function while the
        # streams are copies) — equal h_pre keep the streams copies forever and every Mix gradient's
        # tangent part exactly 0 (docs/mhc.md, "Static (Birkhoff Mix) vs dynamic path")
        init[:n] = [math.log(q / (1 - q)) for q in ((1.5 - i / (n - 1)) / n for i in range(n))]
    if not use_mix:
        init += (tau * torch.eye(n, dtype=torch.float64)).flatten().tolist()
    return init


class _StreamsBond(Bond):
    """A width-preserving bond between 1 and n streams."""

    preserves_dim = True

    def __init__(self, streams: int):
        super().__init__()
        if not is_count(streams):
            raise ValueError(f"streams must be a positive int, got {streams!r}")
        self.streams = streams


class ExpandStreams(_StreamsBond):
    """ExpandStreams(n): (..., C) ↦ (..., n, C), every stream a copy of x (sensitivity 1 in the
    stream norm, linear)."""

    def forward(self, x):
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.streams, x.size(-1))


class CollapseStreams(_StreamsBond):
    """CollapseStreams(n): (..., n, C) ↦ (..., C), the mean of the streams (a convex combination:
    sensitivity 1, linear). With identical streams it is the identity on each of them."""

    def forward(self, x):
        if x.ndim < 2 or x.size(-2) != self.streams:
            raise ValueError(f"CollapseStreams({self.streams}) expects (..., {self.streams}, C), got {tuple(x.shape)}")
        return x.mean(dim=-2)


class HyperConnections(Module):
    """HyperConnections(branch, streams=4, dynamic=True, constrained=True, sinkhorn_iters=20,
    sinkhorn_tol=None, depth=None, recompute=False, ...): HC/mHC around any module C → C.

    Atoms (besides the branch's): ``phi`` (Linear n·C → m, m = 2n + n², dynamic only), ``gate``
    (three gates α_pre, α_post, α_res = gate_scale·g, g initialised to 1), ``static`` (b), and with
    ``dynamic=False`` in mHC a ``mix`` (Birkhoff Mix atom: H_res is its weight, and b holds only
    the pre/post logits).

    Init (mHC): b_pre = −log(n − 1) (h_pre = 1/n), b_post = 0 (h_post = 1), b_res = τI with
    diagonal ``res_init_diagonal`` (0.95 → τ = log(0.95(n−1)/0.05)); HC: b_pre = 1/n, b_post = 1,
    b_res = I. Streams start as copies (ExpandStreams), so the network then computes exactly the
    plain residual x + F(x) up to the dynamic terms (gates 0.01).

    ``depth=L`` (the number of hyper-connected branches in the network) scales the residual mix by
    1 − 1/L and the branch output by 1/L, like the plain residual, so that the block's sensitivity is
    1 + O(1/L) when the dynamic gates are small (docs/mhc.md). ``recompute=True`` recomputes the
    coefficient path in backward (activation checkpointing). ``sinkhorn_tol`` switches Sinkhorn to
    its tolerance mode. ``branch_output_bound`` M_F bounds ‖F(u)‖ (default ν_F: true for branches that
    start with RMSNorm and vanish at 0, as the GPT branches).
    """

    def __init__(self, branch, streams=4, dynamic=True, constrained=True, sinkhorn_iters=20, sinkhorn_tol=None,
                 depth=None, recompute=False, width=None, gate_scale=0.01, res_init_diagonal=0.95,
                 coeff_mass=0.5, branch_output_bound=None, sinkhorn_max_iters=1000, norm_at="init"):
        super().__init__()
        branch = _as_module(branch, width)
        width = _check_options(branch, streams, width, depth, (sinkhorn_iters, sinkhorn_max_iters), sinkhorn_tol,
                               coeff_mass, norm_at)
        self.norm_at, self.branch, self.streams, self.width = norm_at, branch, streams, width
        self.dynamic, self.constrained, self.recompute = bool(dynamic), bool(constrained), bool(recompute)
        self.sinkhorn_iters, self.sinkhorn_tol, self.sinkhorn_max_iters = sinkhorn_iters, sinkhorn_tol, sinkhorn_max_iters
        self.depth = None if depth is None else int(depth)
        self.in_dim = self.out_dim = width
        self.branch_output_bound = _check_bound(branch_output_bound)
        n = streams
        self.n_coeffs = 2 * n + n * n
        use_mix = self.constrained and not self.dynamic
        init = _static_init(n, self.constrained, use_mix, res_init_diagonal)
        self.static = StaticCoefficients(n, init, with_res=not use_mix, norm="rms" if self.constrained else "mixing",
                                         mass=coeff_mass * (0.25 if self.dynamic else 0.5))
        if self.dynamic:
            self.phi = atoms.Linear(n * width, self.n_coeffs, role="hyper_phi", mass=coeff_mass * 0.5)
            self.gate = Gate((n, n, n * n), scale=gate_scale, mass=coeff_mass * 0.25)
        if use_mix:
            self.mix = Mix(n, init_diagonal=res_init_diagonal, mass=coeff_mass * 0.5)
        self._record = None  # the dict of recording() while one is open

    # ----------------------------------------------------------------- coefficients
    @property
    def residual_scale(self) -> float:
        """ρ = 1 − 1/L (1 without depth)."""
        return 1.0 if self.depth is None else 1.0 - 1.0 / self.depth

    @property
    def branch_scale(self) -> float:
        """β = 1/L (1 without depth)."""
        return 1.0 if self.depth is None else 1.0 / self.depth

    def _coefficient_weights(self) -> tuple:
        """What the coefficient map reads besides x φ and Σx²: b, then g (dynamic) or the Mix weight
        (static mHC)."""
        if self.dynamic:
            return self.static.weight, self.gate.weight
        if self.constrained:
            return self.static.weight, self.mix.weight
        return (self.static.weight,)

    def _phi_matrix(self):
        """φ as an (n·C, m) matrix, x̃ φ = phi(x̃); None without the dynamic path."""
        return self.phi.weight.mT * self.phi.gain if self.dynamic else None

    def _coefficients_from(self, cdt, raw, sumsq, b, w=None):
        """(h_pre, h_post, h_res) in dtype ``cdt`` from x φ and Σx² (None without the dynamic path),
        the static logits b and the gate weight g or the Mix weight w; not yet broadcast to the tokens.
        H̃ = α ⊙ z + b with z = x φ / rms(x) (tanh(z) in HC), α = gate_scale·g per group."""
        n, C = self.streams, self.width
        h = b.to(cdt)
        if self.dynamic:
            z = raw * torch.rsqrt(sumsq / (n * C) + _EPS).unsqueeze(-1)
            if not self.constrained:
                z = torch.tanh(z)
            h = z * (self.gate.scale * w[self.gate.index]).to(cdt) + h  # = self.gate(z) + b, with g = w
        pre, post = h[..., :n], h[..., n:2 * n]
        if not self.constrained:
            return pre, post, h[..., 2 * n:].unflatten(-1, (n, n))
        # one stream: nothing to mix, and σ < 1 could never give Σ h_pre = 1 (the plain residual at
        # init, docs/mhc.md), so the pre-mix is the identity; h_post stays learned
        pre = torch.sigmoid(pre) if n > 1 else torch.ones_like(pre)
        post = 2.0 * torch.sigmoid(post)
        if not self.dynamic:
            return pre, post, w.to(cdt)
        res, err = self.project_residual(h[..., 2 * n:].unflatten(-1, (n, n)), return_error=True)
        if self._record is not None:
            self._record["marginal_error"] = float(err)
        return pre, post, res

    def project_residual(self, logits, return_error=False):
        """H_res = Sinkhorn(exp(L)) for logits L (..., n, n), with this layer's iteration settings.

        The final half-step normalises rows, so H_res is exactly row-stochastic: the kernel normalises
        rows then columns, so it runs on Lᵀ and the result is transposed back (same scaling family).
        With ``return_error`` also returns the worst marginal error |row or column sum − 1| reached
        (a 0-dim tensor)."""
        P, err = kernels.sinkhorn(logits.mT, iters=self.sinkhorn_iters, tol=self.sinkhorn_tol,
                                  max_iters=self.sinkhorn_max_iters, return_error=True)
        return (P.mT, err) if return_error else P.mT

    def static_residual(self, return_error=False):
        """H_res from the static parameters alone (dynamic term switched off, z = 0), (n, n) in float64,
        without gradient. With ``return_error`` also the Sinkhorn marginal error as a float (None
        where no Sinkhorn runs: HC, and static mHC whose H_res is the Mix weight)."""
        n = self.streams
        with torch.no_grad():
            if self.constrained and not self.dynamic:
                H, err = self.mix.weight.double(), None
            elif not self.constrained:
                H, err = self.static.weight.double()[2 * n:].reshape(n, n), None
            else:
                H, err = self.project_residual(self.static.weight.double()[2 * n:].reshape(n, n), return_error=True)
                err = float(err)
        return (H, err) if return_error else H

    @contextlib.contextmanager
    def recording(self):
        """Record what the forward pass computes: inside ``with layer.recording() as rec:`` every
        forward stores ``rec["h_res"]`` (that batch's H_res, detached, without the depth factor ρ) and,
        where a Sinkhorn runs, ``rec["marginal_error"]`` (float; one host sync per forward)."""
        self._record = record = {}
        try:
            yield record
        finally:
            self._record = None

    def coefficients(self, x):
        """(h_pre (..., n), h_post (..., n), h_res (..., n, n)) for a stream tensor x (..., n, C),
        in the coefficient dtype (fp32; fp64 for fp64 x); orientation h_res[..., i, j] = weight of
        stream j in stream i."""
        self._check_input(x)
        raw = sumsq = None
        if self.dynamic:
            raw, sumsq = kernels.mhc_coeff_input(x.flatten(-2), self._phi_matrix())
        pre, post, res = self._coefficients_from(_coeff_dtype(x), raw, sumsq, *self._coefficient_weights())
        if self._record is not None:
            self._record["h_res"] = res.detach()
        lead, n = x.shape[:-2], self.streams
        return pre.expand(*lead, n), post.expand(*lead, n), res.expand(*lead, n, n)

    def _check_input(self, x):
        if x.ndim < 2 or x.size(-2) != self.streams or x.size(-1) != self.width:
            raise ValueError(f"HyperConnections(streams={self.streams}, width={self.width}) expects a stream tensor "
                             f"(..., {self.streams}, {self.width}), got {tuple(x.shape)}")

    def forward(self, x):
        self._check_input(x)
        cdt, rho, beta = _coeff_dtype(x), self.residual_scale, self.branch_scale

        def mixing(raw, sumsq, *weights):  # the layer's (h_pre, β·h_post, ρ·h_res)
            pre, post, res = self._coefficients_from(cdt, raw, sumsq, *weights)
            if self._record is not None:
                self._record["h_res"] = res.detach()
            return pre, beta * post, rho * res

        return kernels.mhc_layer(x, lambda u: _branch_output(self.branch, u, self.width), mixing, self._phi_matrix(),
                                 self._coefficient_weights(), recompute=self.recompute)

    # ----------------------------------------------------------------- modular metadata
    def _parts(self, nu_f=None):
        """[(module, s)]: s bounds ‖Δout‖ per unit of that part's own norm (docs/mhc.md); ``nu_f``
        overrides the branch's sensitivity (the norm at init uses its norm_sensitivity)."""
        b = sensitivity_constants(self, nu_f)
        parts = [(self.branch, b["s_branch"]), (self.static, b["s_static"])]
        if self.dynamic:
            parts += [(self.phi, b["s_phi"]), (self.gate, b["s_gate"])]
        if self.constrained and not self.dynamic:
            parts.append((self.mix, b["s_mix"]))
        return parts

    @property
    def mass(self):
        return sum((m.mass for m, _ in self._parts()), 0.0)

    @property
    def sensitivity(self):
        b = sensitivity_constants(self)
        return b["direct"] + b["dynamic"]

    @property
    def sharpness(self):
        # Not derived: the second derivative of the coefficient path through the RMS normaliser,
        # σ and the unrolled Sinkhorn has no simple weight-independent bound (docs/mhc.md).
        return Sharpness(S.INF, S.INF, S.INF)

    @property
    def norm_sensitivity(self):
        """ν used for the modular norm. ``norm_at="bound"``: the certified bound (= sensitivity).
        ``norm_at="init"`` (default): the block's constants at initialisation — streams equal,
        Σ h_pre = 1, h_post = 1, H_res ≈ I, gates ≈ 0 — i.e. those of the plain residual,
        ρ + β·ν_F, so an mHC network takes the same per-atom steps as its plain-residual twin.
        The worst-case bound grows to ρ + 2nβν_F (Σσ ≤ n, 2σ ≤ 2), which over 2L layers
        compounds to e^(2n−1)-sized coefficients that all but freeze the lower layers."""
        if self.norm_at == "bound":
            with static_constants():
                return self.sensitivity
        return self.residual_scale + self.branch_scale * float(S.to_number(self.branch.norm_sensitivity))

    @property
    def weight_gain(self):
        """κ = Σ_parts (μ_p/μ)·κ_p·s_p/s'_p: s_p the certified effect per unit of the part's norm,
        s'_p the one its norm coefficient is built with (they differ for the branch with
        ``norm_at="init"``, h_post ≤ 2 against 1, and everywhere under ``claims.certify``)."""
        mu = self.mass
        cert = self._parts()
        with static_constants():
            built = dict((id(m), s) for m, s in self._norm_parts())
        total = 0.0
        for part, s in cert:
            s_n = built[id(part)]
            if S.is_zero(part.mass) or s == 0:
                continue
            ratio = math.inf if s_n == 0 else s / s_n
            total += (part.mass / mu) * float(S.to_number(part.weight_gain)) * ratio
        return total

    def _norm_parts(self):
        """[(part, s')]: the per-part scale the modular norm is built with."""
        if self.norm_at == "bound":
            return self._parts()
        # init constants: the branch's norm_sensitivity (Modula's per-head attention constant), and the
        # branch enters with h_post = 1 (not the bound 2)
        parts = self._parts(nu_f=self.branch.norm_sensitivity)
        return [(m, self.branch_scale if m is self.branch else s) for m, s in parts]

    def _coefficient_map(self):
        mu = self.mass
        out = {}
        for part, s in self._norm_parts():
            if S.is_zero(part.mass) or s == 0:
                continue
            for atom, c in part._coefficient_map().items():
                c = c * s * mu / part.mass
                out[atom] = max(out[atom], c) if atom in out else c
        return out

    def extra_repr(self):
        kind = "mHC" if self.constrained else "HC"
        return (f"{kind}, streams={self.streams}, width={self.width}, dynamic={self.dynamic}, depth={self.depth}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, sinkhorn_tol={self.sinkhorn_tol}, recompute={self.recompute}")

