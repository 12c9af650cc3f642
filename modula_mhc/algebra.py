"""The composition algebra: ``@`` (composition), ``+`` (sum on one input), tuples (parallel),
``a * M`` (scalar multiple), ``M ** L`` (depth) and the residual helper.

Each construction derives mass μ, sensitivity ν, sharpness (α, β, γ) and norm coefficients from
its parts (rules in docs/algebra.md):

=================  =========  =========  ==============================================
construction       mass       sens.      norm of (w1, w2)
=================  =========  =========  ==============================================
M2 ∘ M1            μ1+μ2      ν1·ν2      max(ν2·(μ/μ1)‖w1‖, (μ/μ2)‖w2‖)
(M1, M2), M1+M2    μ1+μ2      ν1+ν2      max((μ/μ1)‖w1‖, (μ/μ2)‖w2‖)
a·M                μ          |a|·ν      |a|·‖w‖
=================  =========  =========  ==============================================

Terms with μ_i = 0 drop out, so modules without weights never divide by zero.
"""
from __future__ import annotations

import copy

from torch import nn

from . import scalars as S
from .algebra_depth import SymbolicRepeat, repeated_sharpness
from .module import CONSTRUCTIONS, Bond, Module, Sharpness

__all__ = ["Compose", "Parallel", "Sum", "Scale", "Identity", "SymbolicRepeat", "compose", "compose2_sharpness",
           "repeat", "repeated_sharpness", "residual", "scale_input"]


def _merge(target: dict, source: dict, factor):
    """Add scaled coefficients; an atom reached along two paths keeps the larger one."""
    for atom, c in source.items():
        c = c * factor
        target[atom] = S.maximum(target[atom], c) if atom in target else c


def _dim_str(m):
    return f"{type(m).__name__}(in={m.in_dim}, out={m.out_dim})"


def _dims_conflict(a, b):
    return a is not None and b is not None and S.is_number(a) and S.is_number(b) and not isinstance(a, tuple) \
        and not isinstance(b, tuple) and a != b


def compose2_sharpness(m2_mass, m2_sens, m2_sharp, m1_mass, m1_sens, m1_sharp, m2_norm_sens=None, m1_gain=1.0):
    """Sharpness of M2 ∘ M1 (derivation in docs/algebra.md). With p1 = μ1/(μν2'), p2 = μ2/μ
    (ν2' = M2's norm_sensitivity, the one the modular norm is built with; default ν2) and κ1 = M1's
    weight gain (‖D_w1 f1·Δw1‖ ≤ κ1‖Δw1‖):
    α = α2 p2² + 2β2 κ1 p1 p2 + (γ2 κ1² + ν2 α1) p1²,  β = β2 ν1 p2 + (γ2 κ1 ν1 + ν2 β1) p1,
    γ = γ2 ν1² + ν2 γ1."""
    a1, b1, g1 = m1_sharp
    a2, b2, g2 = m2_sharp
    nu2n = m2_sens if m2_norm_sens is None else m2_norm_sens
    k1 = m1_gain
    mu = m1_mass + m2_mass
    m = S.product  # 0·∞ = 0: a term that cannot occur contributes nothing
    gamma = m(g2, m1_sens ** 2) + m(m2_sens, g1)
    if S.is_zero(mu):
        return Sharpness(0.0, 0.0, gamma)
    p2 = 0 if S.is_zero(m2_mass) else m2_mass / mu
    p1 = 0 if (S.is_zero(m1_mass) or S.is_zero(nu2n)) else m1_mass / (mu * nu2n)
    alpha = m(a2, p2 ** 2) + 2 * m(b2, k1, p1, p2) + m(g2, k1 ** 2, p1 ** 2) + m(m2_sens, a1, p1 ** 2)
    beta = m(b2, m1_sens, p2) + m(g2, k1, m1_sens, p1) + m(m2_sens, b1, p1)
    return Sharpness(alpha, beta, gamma)


class Compose(Module):
    """Sequential composition; ``mods`` in execution order (``M2 @ M1`` runs M1 first)."""

    def __init__(self, *mods):
        super().__init__()
        flat = []
        for m in mods:
            if not isinstance(m, Module):
                raise TypeError(f"cannot compose {type(m).__name__}: expected a modula_mhc Module")
            flat.extend(m.layers if type(m) is Compose else [m])
        # propagate widths into dimension-agnostic neighbours, then validate
        for _ in range(2):
            for prev, nxt in zip(flat, flat[1:]):
                if isinstance(prev.out_dim, tuple):
                    nxt.bind_input_dims(prev.out_dim)
                if nxt.in_dim is None and nxt.preserves_dim and prev.out_dim is not None:
                    nxt.bind_dim(prev.out_dim)
                if prev.out_dim is None and prev.preserves_dim and nxt.in_dim is not None:
                    prev.bind_dim(nxt.in_dim)
        for prev, nxt in zip(flat, flat[1:]):
            if _dims_conflict(prev.out_dim, nxt.in_dim):
                raise ValueError(f"shape mismatch in composition: {_dim_str(nxt)} @ {_dim_str(prev)}: "
                                 f"the output width {prev.out_dim} of {type(prev).__name__} does not match "
                                 f"the input width {nxt.in_dim} of {type(nxt).__name__}")
        self.layers = nn.ModuleList(flat)
        self.in_dim = next((m.in_dim for m in flat if m.in_dim is not None or not m.preserves_dim), None)
        out = None
        for m in flat:
            if m.out_dim is not None or not m.preserves_dim:
                out = m.out_dim
        self.out_dim = out
        self.preserves_dim = all(m.preserves_dim for m in flat)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x

    @property
    def mass(self):
        return sum((m.mass for m in self.layers), 0.0)

    @property
    def sensitivity(self):
        nu = 1.0
        for m in self.layers:
            nu = nu * m.sensitivity
        return nu

    @property
    def sharpness(self):
        mass, sens, gain, sharp = 0.0, 1.0, 1.0, Sharpness(0.0, 0.0, 0.0)
        for m in self.layers:
            nu, nu_n = m.sensitivity, m.norm_sensitivity
            sharp = compose2_sharpness(m.mass, nu, m.sharpness, mass, sens, sharp, nu_n, gain)
            total = mass + m.mass
            if not S.is_zero(total):  # κ of the prefix (weight_gain's rule, one layer at a time)
                ratio = nu / nu_n if not S.is_zero(nu_n) else (1.0 if S.is_zero(nu) else S.infinity())
                gain = (S.product(mass, gain, ratio) + S.product(m.mass, m.weight_gain)) / total
            mass, sens = total, sens * nu
        return sharp

    def _coefficient_map(self):
        mu = self.mass
        out = {}
        if S.is_zero(mu):
            return out
        after = 1.0  # product of sensitivities of the modules after layer i
        for m in reversed(self.layers):
            if not S.is_zero(m.mass) and not S.is_zero(after):
                _merge(out, m._coefficient_map(), after * mu / m.mass)
            after = after * m.norm_sensitivity
        return out

    @property
    def norm_sensitivity(self):
        nu = 1.0
        for m in self.layers:
            nu = nu * m.norm_sensitivity
        return nu

    @property
    def weight_gain(self):
        """κ = Σ_i (μ_i/μ)·κ_i·Π_{j>i} ν_j/ν'_j (ν' = norm_sensitivity): layer i's weights move the
        output by ≤ Π_{j>i}ν_j·κ_i‖Δw_i‖ and the norm gives ‖Δw_i‖ ≤ (μ_i/(μ·Π_{j>i}ν'_j))‖Δw‖_M."""
        mu = self.mass
        if S.is_zero(mu):
            return 1.0
        total, ratio = 0.0, 1.0
        for m in reversed(self.layers):
            if not S.is_zero(m.mass):
                total = total + (m.mass / mu) * m.weight_gain * ratio
            nu, nu_n = m.sensitivity, m.norm_sensitivity
            if not S.is_zero(nu_n):
                ratio = ratio * nu / nu_n
            elif not S.is_zero(nu):
                ratio = S.infinity()
        return total


class _Branches(Module):
    """Shared rules of modules that apply several branches to one input."""

    def __init__(self, *mods):
        super().__init__()
        for m in mods:
            if not isinstance(m, Module):
                raise TypeError(f"expected modula_mhc Modules, got {type(m).__name__}")
        ins = [m.in_dim for m in mods if m.in_dim is not None]
        for a in ins:
            if _dims_conflict(a, ins[0]):
                raise ValueError(f"branches take different input widths: {[_dim_str(m) for m in mods]}")
        if ins:
            for m in mods:
                if m.in_dim is None and m.preserves_dim:
                    m.bind_dim(ins[0])
        self.branches = nn.ModuleList(mods)
        self.in_dim = ins[0] if ins else None

    @property
    def mass(self):
        return sum((m.mass for m in self.branches), 0.0)

    @property
    def sensitivity(self):
        return sum((m.sensitivity for m in self.branches), 0.0)

    @property
    def norm_sensitivity(self):
        return sum((m.norm_sensitivity for m in self.branches), 0.0)

    @property
    def sharpness(self):
        mu = self.mass
        a = b = g = 0.0
        for m in self.branches:
            ma, mb, mg = m.sharpness
            g = g + mg
            if not S.is_zero(m.mass):
                p = m.mass / mu
                a, b = a + S.product(ma, p ** 2), b + S.product(mb, p)
        return Sharpness(a, b, g)

    @property
    def weight_gain(self):
        """κ = Σ_i (μ_i/μ)·κ_i (each branch's weights move only its own output)."""
        mu = self.mass
        if S.is_zero(mu):
            return 1.0
        return sum(((m.mass / mu) * m.weight_gain for m in self.branches if not S.is_zero(m.mass)), 0.0)

    def _coefficient_map(self):
        mu = self.mass
        out = {}
        for m in self.branches:
            if not S.is_zero(m.mass):
                _merge(out, m._coefficient_map(), mu / m.mass)
        return out


class Parallel(_Branches):
    """Tuple of modules on one input: x ↦ (M1(x), M2(x), …); output norm = sum of norms."""

    def __init__(self, *mods):
        super().__init__(*mods)
        self.out_dim = tuple(m.out_dim for m in mods)

    def forward(self, x):
        return tuple(m(x) for m in self.branches)


class Sum(_Branches):
    """M1 + M2 on the same input: x ↦ M1(x) + M2(x)."""

    def __init__(self, *mods):
        super().__init__(*mods)
        outs = [m.out_dim if m.out_dim is not None else (m.in_dim if m.preserves_dim else None) for m in mods]
        known = [o for o in outs if o is not None]
        for o in known:
            if _dims_conflict(o, known[0]):
                raise ValueError(f"cannot add modules with output widths {known}: "
                                 f"{[_dim_str(m) for m in mods]}")
        self.out_dim = known[0] if known else None
        self.preserves_dim = all(m.preserves_dim for m in mods)

    def forward(self, x):
        out = None
        for m in self.branches:
            y = m(x)
            out = y if out is None else out + y
        return out


#: magnitudes a nonzero scale factor may have: norms scale by |a| and dual targets by 1/|a|, in
#: float32 (1e40·M gave an infinite norm, 1e-40·M a LinAlgError and non-finite weights after a step)
SCALE_RANGE = (1e-12, 1e12)


class Scale(Module):
    """a · M: output scaled by the constant a (sensitivity |a|·ν, norm |a|·‖w‖)."""

    def __init__(self, a, module):
        super().__init__()
        if isinstance(a, Module) and not isinstance(module, Module):
            a, module = module, a
        if not isinstance(module, Module):
            raise TypeError(f"can only scale a modula_mhc Module, got {type(module).__name__}")
        if not (S.is_number(a) or S.is_symbolic(a)):
            raise TypeError(f"scale factor must be a finite number or a sympy expression, got {a!r}")
        if S.is_number(a) and a != 0 and not (SCALE_RANGE[0] <= abs(float(a)) <= SCALE_RANGE[1]):
            raise ValueError(f"scale factor must be 0 or of magnitude in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}], "
                             f"got {a!r}: the float32 norms and dual targets of the scaled module overflow")
        self.a = a
        self.module = module
        self.in_dim, self.out_dim, self.preserves_dim = module.in_dim, module.out_dim, module.preserves_dim

    def bind_dim(self, dim):
        self.module.bind_dim(dim)
        self.in_dim, self.out_dim = self.module.in_dim, self.module.out_dim

    def forward(self, x):
        a = float(self.a) if not S.is_symbolic(self.a) else self.a
        return a * self.module(x)

    @property
    def mass(self):
        return self.module.mass

    @property
    def sensitivity(self):
        return S.absolute(self.a) * self.module.sensitivity

    @property
    def norm_sensitivity(self):
        return S.absolute(self.a) * self.module.norm_sensitivity

    @property
    def weight_gain(self):
        return self.module.weight_gain

    @property
    def sharpness(self):
        al, be, ga = self.module.sharpness
        if S.is_zero(self.a):
            return Sharpness(0.0, 0.0, 0.0)
        a = S.absolute(self.a)
        return Sharpness(al / a, be, a * ga)

    def _coefficient_map(self):
        if S.is_zero(self.a):
            return {}
        out = {}
        _merge(out, self.module._coefficient_map(), S.absolute(self.a))
        return out

    def extra_repr(self):
        return f"a={self.a}"


class Identity(Bond):
    """x ↦ x."""

    preserves_dim = True

    def forward(self, x):
        return x


def _fresh_copy(module: Module) -> Module:
    """A deep copy with newly initialised weights (for ``M ** L``)."""
    new = copy.deepcopy(module)
    for a in new.atoms():
        a.reset_parameters()
    return new


def repeat(module: Module, depth) -> Module:
    """M ** L: L copies of M with their own weights, composed (integer L), or a closed form
    for a symbolic L."""
    if S.is_symbolic(depth):
        return SymbolicRepeat(module, depth)
    if not S.is_number(depth) or int(depth) != depth or depth < 1:
        raise ValueError(f"depth in M ** L must be a positive integer or a sympy symbol, got {depth!r}")
    depth = int(depth)
    return Compose(module, *[_fresh_copy(module) for _ in range(depth - 1)])


def compose(m2, m1) -> Module:
    """M2 @ M1 (M1 runs first); a tuple/list of modules on either side becomes a Parallel."""
    if isinstance(m2, (tuple, list)):
        m2 = Parallel(*m2)
    if isinstance(m1, (tuple, list)):
        m1 = Parallel(*m1)
    if not isinstance(m1, Module) or not isinstance(m2, Module):
        bad = m1 if not isinstance(m1, Module) else m2
        raise TypeError(f"cannot compose with {type(bad).__name__}: expected a modula_mhc Module or a tuple of them")
    return Compose(m1, m2)


def residual(block: Module, depth) -> Module:
    """(1 − 1/L)·x + (1/L)·block(x): sensitivity 1 − 1/L + ν/L (= 1 when ν = 1) and a 1/L share of
    the output per block, which is what makes the learning rate transfer in depth."""
    if not S.is_symbolic(depth) and not (S.is_number(depth) and depth >= 1):
        raise ValueError(f"residual depth must be a finite number >= 1 or a sympy symbol, got {depth!r}")
    one = S.one(like=depth)
    return Sum(Scale(one - one / depth, Identity()), Scale(one / depth, block))


def scale_input(module: Module, a) -> Module:
    """M * a: x ↦ M(a·x), the composition M ∘ (a·Identity)."""
    return compose(module, Scale(a, Identity()))


# Module's operators (@, +, *, /, **) build these (module.py cannot import this file)
CONSTRUCTIONS.update(compose=compose, sum=Sum, scale=Scale, scale_input=scale_input, repeat=repeat)
