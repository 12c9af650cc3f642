"""M ** L for a symbolic depth L: one prototype and closed forms in L.

For L copies of M (mass μ, sensitivity ν) the composition rules of :mod:`modula_mhc.algebra`
fold to mass Lμ, sensitivity ν^L, norm coefficient L·ν^(L−l)·c for the copy at depth l, and a
sharpness that solves the composition recurrence P_k = M ∘ P_{k−1} (docs/algebra.md).
"""
from __future__ import annotations

import functools

from . import scalars as S
from .module import Module, Sharpness


class SymbolicRepeat(Module):
    """M ** L for a symbolic depth L: one prototype, closed-form properties.

    For L copies of M (mass μ, sensitivity ν): mass Lμ, sensitivity ν^L; the copy at depth
    l (1 = nearest the input) has norm coefficient L·ν^(L−l)·c; sharpness solves the
    composition recurrence (docs/algebra.md)."""

    @property
    def layer_index(self):
        """The symbol l (1 = nearest the input) of a copy's position; sympy is imported only here,
        where a symbolic depth already brought it in."""
        return layer_index_symbol()

    def __init__(self, module, depth):
        super().__init__()
        self.module, self.depth = module, depth
        self.in_dim, self.out_dim, self.preserves_dim = module.in_dim, module.out_dim, module.preserves_dim

    def forward(self, x):
        raise RuntimeError("a network with symbolic depth cannot run; build it with an integer depth")

    @property
    def mass(self):
        return self.depth * self.module.mass

    @property
    def sensitivity(self):
        return self.module.sensitivity ** self.depth

    @property
    def norm_sensitivity(self):
        return self.module.norm_sensitivity ** self.depth

    @property
    def weight_gain(self):
        """κ·Σ_l (1/L)·r^(L−l) with r = ν/ν' (= κ when the norm uses the certified ν). With ν' = 0
        (a module whose output ignores its input, e.g. ``M * 0``) only the last copy moves the
        output: κ, as the built composition gives (ν'/ν' was a ZeroDivisionError)."""
        import sympy
        nu, nu_n = self.module.sensitivity, self.module.norm_sensitivity
        if S.is_zero(nu_n):
            return self.module.weight_gain if S.is_zero(nu) else S.infinity(nu)
        r = nu / nu_n
        if _same(r, 1):
            return self.module.weight_gain
        # an explicit sum, not the geometric closed form (r^L − 1)/(L(r − 1)): that is 0/0 wherever r
        # is 1 after substitution (heads H = 1, or a float 1.0 that sympy's == does not equal to 1)
        j = sympy.Symbol("j_gain", positive=True, integer=True)
        return self.module.weight_gain * sympy.Sum(r ** (self.depth - j), (j, 1, self.depth)) / self.depth

    @property
    def sharpness(self):
        m = self.module
        return repeated_sharpness(m.mass, m.sensitivity, m.sharpness, self.depth, norm_sensitivity=m.norm_sensitivity,
                                  weight_gain=m.weight_gain)

    def _coefficient_map(self):
        if S.is_zero(self.module.mass):
            return {}
        L, nu = self.depth, self.module.norm_sensitivity
        if S.is_zero(nu):  # copies below the last cannot move the output: frozen (∞), as when built
            import sympy
            l = self.layer_index
            return {atom: sympy.Piecewise((c * L, sympy.Eq(l, L)), (sympy.oo, True))
                    for atom, c in self.module._coefficient_map().items()}
        return {atom: c * L * nu ** (L - self.layer_index) for atom, c in self.module._coefficient_map().items()}


def layer_index_symbol():
    """The sympy symbol l used for a block's position inside ``M ** L`` (equal on every call)."""
    import sympy  # lazily: ``import modula_mhc`` does not pay for sympy
    return sympy.Symbol("l", positive=True, integer=True)


def _same(a, b) -> bool:
    """Structural equality (no sympy.simplify: it is slow on GPT-sized expressions; a false
    "different" only selects the general closed form, which is exact as well)."""
    if S._is_sympy(a) or S._is_sympy(b):
        import sympy
        # .is_zero, not == 0: sympy ≥ 1.13 has Float(0.0) != 0, so a float 1.0 never equalled 1
        return sympy.sympify(sympy.sympify(a) - sympy.sympify(b)).is_zero is True
    return a == b


def repeated_sharpness(mass, nu, sharp, depth, norm_sensitivity=None, weight_gain=1.0):
    """Closed-form sharpness of M∘…∘M (depth copies) by solving the composition recurrence
    P_k = M ∘ P_{k−1} (docs/algebra.md); tests compare it with the unrolled fold.

    The sums are solved for placeholder symbols (a, b, g, v) and the module's own values are
    substituted afterwards, which keeps sympy's summation on simple geometric-polynomial terms.
    When the norm is built with ν' ≠ ν or the module's weight gain κ ≠ 1 (attention with several
    heads), the general recurrence is returned as explicit finite sums (``sympy.Sum``), exact once
    the depth is a number."""
    import sympy
    nu_n = nu if norm_sensitivity is None else norm_sensitivity
    if S.is_zero(nu_n):
        return _blind_repeated_sharpness(mass, nu, sharp, depth)
    infinite = [_has_infinity(v) for v in sharp]
    if any(infinite):
        # which constants of P_k (k ≥ 2) take an infinite one of M with a positive coefficient:
        # α all three, β those of β and γ, γ that of γ (docs/algebra.md, the recurrences); with
        # ∞ substituted into the closed forms, ∞ − ∞ and 0·∞ made them nan
        reach = (any(infinite), infinite[1] or infinite[2], infinite[2])
        base = (None,) * 3 if all(reach) else repeated_sharpness(
            mass, nu, [0 if inf else v for v, inf in zip(sharp, infinite)], depth, norm_sensitivity, weight_gain)
        return Sharpness(*(_infinite_beyond_one(own, depth, mass, i) if hit else b
                           for i, (own, b, hit) in enumerate(zip(sharp, base, reach))))
    if not (_same(nu, nu_n) and _same(weight_gain, 1)):
        return _general_repeated_sharpness(mass, nu, nu_n, weight_gain, sharp, depth)
    (a, b, g, v, k), (alpha_k, beta_k, gamma_k) = _plain_closed_forms()
    if S.is_zero(mass):
        alpha_k = beta_k = sympy.Integer(0)
    values = {a: sympy.sympify(sharp[0]), b: sympy.sympify(sharp[1]), g: sympy.sympify(sharp[2]),
              v: sympy.sympify(nu), k: depth}
    return Sharpness(*(e.subs(values) for e in (alpha_k, beta_k, gamma_k)))


@functools.lru_cache(maxsize=1)
def _plain_closed_forms():
    """((α, β, γ, ν, k) placeholders, (α_k, β_k, γ_k)): the recurrences with ν' = ν, κ = 1 solved
    once (sympy's summation is the slow part of every symbolic sharpness)."""
    import sympy
    k, j = sympy.symbols("k j", positive=True, integer=True)
    a, b, g, v = sympy.symbols("alpha beta gamma nu", positive=True)

    def total(term):  # Σ_{j=1..k} term(j)
        return sympy.summation(term.subs(k, j), (j, 1, k))

    # gamma_k = g v^(2k-2) + v gamma_{k-1}  →  Σ_j v^(k-j) g v^(2j-2)
    gamma_k = sympy.summation(v ** (k - j) * g * v ** (2 * j - 2), (j, 1, k))
    # B_k = k beta_k satisfies B_k = B_{k-1} + b v^(k-1) + g (k-1) v^(k-2)
    beta_k = total(b * v ** (k - 1) + g * (k - 1) * v ** (k - 2)) / k
    # A_k = k^2 v^k alpha_k satisfies A_k = A_{k-1} + a v^k + 2 b (k-1) v^(k-1) + g (k-1)^2 v^(k-2)
    alpha_k = total(a * v ** k + 2 * b * (k - 1) * v ** (k - 1) + g * (k - 1) ** 2 * v ** (k - 2)) / (k ** 2 * v ** k)
    return (a, b, g, v, k), (alpha_k, beta_k, gamma_k)


def _has_infinity(v) -> bool:
    """True when a constant is ∞ (math.inf, sympy oo, or an expression such as oo·√d)."""
    if S._is_sympy(v):
        return bool(v.has(*_infinities()))
    return S.to_number(v) == S.INF


def _infinities():
    import sympy
    return sympy.oo, sympy.zoo


def _infinite_beyond_one(own, depth, mass, which):
    """An infinite constant of M ** L: M's own value at L = 1 (P_1 = M), ∞ from L = 2 on; α and β
    stay 0 for a module without mass (no weights, nothing to differentiate)."""
    import sympy
    if which < 2 and S.is_zero(mass):
        return sympy.Integer(0) if S._is_sympy(depth) else 0.0
    if not S.is_symbolic(depth):
        return own if depth == 1 else S.infinity(own)
    return sympy.Piecewise((own, sympy.Eq(depth, 1)), (sympy.oo, True))


def _blind_repeated_sharpness(mass, nu, sharp, depth):
    """M ** L for M whose norm sensitivity is 0 (its output ignores its input, e.g. ``M * 0``): the
    composition rule has p1 = 0, so P_k = M ∘ P_{k−1} keeps α/k², β·ν^(k−1)/k and γ·ν^(2k−2) +
    ν·γ_{k−1}, which for ν = 0 are M's own constants at k = 1 and (α/k², 0, 0) beyond (the closed
    form of the general case divided by ν^k = 0)."""
    import sympy
    a, b, g = (sympy.sympify(v) for v in sharp)
    if S.is_zero(mass):
        a = b = sympy.Integer(0)
    if not S.is_zero(nu):  # ν' = 0 < ν: no module of the library, the unrolled rule in general
        k, j = sympy.symbols("k_blind j_blind", positive=True, integer=True)
        v = sympy.sympify(nu)
        gamma = sympy.Sum(v ** (k - j) * g * v ** (2 * j - 2), (j, 1, k))
        out = [a / k ** 2, b * v ** (k - 1) / k, gamma]
        out = [e.subs(k, depth) for e in out]
        return Sharpness(*(out if S.is_symbolic(depth) else [float(e.doit()) for e in out]))
    if not S.is_symbolic(depth):
        return Sharpness(*(float(e) for e in (a / depth ** 2,) + ((b, g) if depth == 1 else (0, 0))))
    first = sympy.Eq(depth, 1)
    return Sharpness(a / depth ** 2, sympy.Piecewise((b, first), (0, True)), sympy.Piecewise((g, first), (0, True)))


def _general_repeated_sharpness(mass, nu, nu_n, kappa, sharp, depth):
    """P_k = M ∘ P_{k−1} with r = ν/ν', G_j = (j−1)κ_{j−1} = κ Σ_{i<j} r^(j−1−i) (the prefix's
    weight gain times its share):
    kβ_k = Σ_j r^(k−j) [β ν^(j−1) + (γ/ν') ν^(j−1) G_j],
    k²α_k = Σ_j (ν/ν'²)^(k−j) [α + (2β/ν') G_j + (γ/ν'²) G_j²],   γ_k as in the plain case."""
    import sympy
    a, b, g = (sympy.sympify(v) for v in sharp)
    v, vn, kap = sympy.sympify(nu), sympy.sympify(nu_n), sympy.sympify(kappa)
    k, j, i = sympy.symbols("k_rep j_rep i_rep", positive=True, integer=True)
    r = v / vn
    G = kap * sympy.Sum(r ** (j - 1 - i), (i, 1, j - 1))
    gamma_k = sympy.Sum(v ** (k - j) * g * v ** (2 * j - 2), (j, 1, k))
    beta_k = sympy.Sum(r ** (k - j) * (b * v ** (j - 1) + g / vn * v ** (j - 1) * G), (j, 1, k)) / k
    alpha_k = sympy.Sum((v / vn ** 2) ** (k - j) * (a + 2 * b / vn * G + g / vn ** 2 * G ** 2), (j, 1, k)) / k ** 2
    if S.is_zero(mass):
        alpha_k = beta_k = sympy.Integer(0)
    out = [e.subs(k, depth) for e in (alpha_k, beta_k, gamma_k)]
    if not S.is_symbolic(depth):
        out = [float(e.doit()) for e in out]
    return Sharpness(*out)
