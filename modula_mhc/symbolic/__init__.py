"""Analytic queries: a network's mass, sensitivity, sharpness and norm coefficients as sympy
expressions in its width, depth, heads, context, ….

Pass sympy symbols for any constructor argument; atoms with a symbolic dimension allocate no
tensors and ``M ** L`` with a symbolic L uses closed forms, so the same construction code that
builds a network also describes it. Substituting numbers gives the built network's values at every
depth ≥ 1 (tests/test_symbolic_depth.py checks depths 1–4 and beyond), ∞ where the built network
has ∞ (e.g. the sharpness of ReLU/Abs networks).

Depths. A closed form in L can be wrong at small L where the construction changes shape (an
MLP of depth 1 is one Linear; at depth 2 it has no hidden layer, and the repeated block's closed
form divides 0 by 0). ``properties`` therefore builds the network at depths 1–4 as well (other
arguments stay symbolic) and returns mass, sensitivity and sharpness as ``Piecewise`` expressions:
the built values at the depths where the closed form differs, the closed form elsewhere. Norm
coefficients are per atom, and the atoms themselves differ between depths, so ``norm_coefficients``
describes the general structure, valid for depth ≥ ``valid_from``; ``at_depth[v]`` holds the
built network's own coefficients for each smaller depth v.

What cannot be symbolic (ValueError with this reason): modules whose construction needs a
number — HyperConnections (HC/mHC, so ``GPT(residual="hc"|"mhc")``) need a numeric width (the
coefficient map φ has n·width inputs) and a numeric depth (ρ = 1 − 1/(2L) enters their
per-layer constants as floats); pass numbers for those.

>>> import sympy, modula_mhc as mm
>>> d, L = sympy.symbols("d L", positive=True, integer=True)
>>> p = mm.symbolic.properties(mm.compounds.ResMLP, in_features=784, out_features=10, width=d, depth=L)
>>> p["sensitivity"]
"""
from __future__ import annotations

import sympy

from ..algebra_depth import SymbolicRepeat, layer_index_symbol
from ..module import Module

__all__ = ["properties", "describe", "layer_index", "evaluate", "SMALL_DEPTHS"]

#: symbol used for the position (1 = nearest the input) of a block inside ``M ** L``
layer_index = layer_index_symbol()

#: depths at which ``properties`` builds the network to check (and patch) the closed forms
SMALL_DEPTHS = (1, 2, 3, 4)

_UNDEFINED = (sympy.nan, sympy.zoo)


def _expr(v):
    """A sympy expression for v. No ``sympy.simplify``: on a GPT it took 43 s of a 47 s query, and
    the values (all that the tests and ``evaluate`` use) are the same without it."""
    return sympy.sympify(v)


def describe(module: Module) -> dict:
    """Properties of an already constructed (possibly symbolic) module as sympy expressions."""
    sharp = module.sharpness
    names = {m: n for n, m in module.named_modules()}
    coeffs = module._coefficient_map()
    copies = {}  # atoms inside M ** L (symbolic L) stand for L copies, l = 1..L
    for m in module.modules():
        if isinstance(m, SymbolicRepeat):
            for a in m.module.modules():
                copies[a] = m.depth
    return {
        "mass": _expr(module.mass),
        "sensitivity": _expr(module.sensitivity),
        "sharpness": {"alpha": _expr(sharp.alpha), "beta": _expr(sharp.beta), "gamma": _expr(sharp.gamma)},
        "norm_coefficients": {names.get(a, repr(a)): {"role": a.role, "coefficient": _expr(c),
                                                      "copies": _expr(copies.get(a, 1))}
                              for a, c in coeffs.items()},
    }


def _build(factory, kwargs):
    try:
        module = factory(**kwargs)
    except (ValueError, TypeError) as e:
        symbolic = sorted(k for k, v in kwargs.items() if isinstance(v, sympy.Basic) and not v.is_number)
        if symbolic:
            raise ValueError(f"symbolic.properties: {getattr(factory, '__name__', factory)} cannot be built with "
                             f"symbolic {', '.join(symbolic)}: {e}. Some constructions need numbers (e.g. "
                             "HyperConnections — GPT(residual='hc'/'mhc') — needs a numeric width and depth); "
                             "see modula_mhc.symbolic's docs for what can be symbolic") from e
        raise
    if not isinstance(module, Module):
        raise TypeError(f"{factory!r} did not return a modula_mhc Module")
    return module


def _probe_points(*exprs):
    """A few positive values for the free symbols (other than layer_index) of exprs."""
    syms = sorted({s for e in exprs for s in sympy.sympify(e).free_symbols if s != layer_index}, key=str)
    return [{s: v + i for i, s in enumerate(syms)} for v in (7, 12)]


def _same(a, b) -> bool:
    """True when two expressions agree numerically (∞ = ∞; nan/zoo never agree)."""
    a, b = sympy.sympify(a), sympy.sympify(b)
    if a.has(*_UNDEFINED) or b.has(*_UNDEFINED):
        return False
    for point in _probe_points(a, b):
        x, y = a.subs(point), b.subs(point)
        if x.has(*_UNDEFINED) or y.has(*_UNDEFINED):
            return False
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            return False
        if abs(fx - fy) > 1e-9 * max(1.0, abs(fy)):
            return False
    return True


def _coefficients_by_role(desc, depth_symbol, v):
    """Multiset of (role, coefficient at depth v) with layer_index expanded over 1..v."""
    out = []
    for entry in desc["norm_coefficients"].values():
        c = entry["coefficient"].subs(depth_symbol, v)
        n = entry["copies"].subs(depth_symbol, v)
        if not n.is_number:
            return None  # the count depends on another symbol: cannot compare
        out += [(entry["role"] or "", c.subs(layer_index, l)) for l in range(1, int(n) + 1)]
    return out


def _same_coefficients(general, built, depth_symbol, v) -> bool:
    """The closed-form coefficients at depth v equal the built network's, role by role (as multisets)."""
    by_role = {}
    mine, theirs = _coefficients_by_role(general, depth_symbol, v), _coefficients_by_role(built, depth_symbol, v)
    if mine is None or theirs is None:
        return False
    for role, c in theirs:
        by_role.setdefault(role, []).append(c)
    for role, c in mine:
        pool = by_role.get(role, [])
        match = next((i for i, d in enumerate(pool) if _same(c, d)), None)
        if match is None:
            return False
        pool.pop(match)
    return not any(by_role.values())


def _patch(general, built: dict, symbol):
    """Piecewise: built[v] at the depths v where the closed form differs, the closed form elsewhere;
    a closed form that is undefined (nan/zoo) past the sampled depths takes the largest sampled
    depth's value when that is ∞ (the built networks' ∞)."""
    general = sympy.sympify(general)
    deepest = max(built)
    # undefined beyond the sampled depths too when ∞ terms cancel to nan only once a depth is
    # substituted (oo·f(L) − oo·g(L)): checked at a few larger depths, only where it can matter
    if built[deepest] == sympy.oo and (general.has(*_UNDEFINED) or any(
            general.subs(symbol, v).has(*_UNDEFINED) for v in (deepest + 1, 2 * deepest + 1, 50))):
        general = built[deepest]
    pieces = [(b, sympy.Eq(symbol, v)) for v, b in sorted(built.items()) if not _same(general.subs(symbol, v), b)]
    if not pieces:
        return general
    return sympy.Piecewise(*pieces, (general, True))


def properties(factory, /, **kwargs) -> dict:
    """Build ``factory(**kwargs)`` (a compound class or any function returning a Module) with
    symbolic arguments and return {"mass", "sensitivity", "sharpness": {alpha, beta, gamma},
    "norm_coefficients": {atom path: {role, coefficient, copies}}} as sympy expressions. An atom
    inside ``M ** L`` stands for ``copies`` = L atoms, the l-th (l = 1..L, :data:`layer_index`) with
    the coefficient at that l; where ``copies`` < 1 at some depth, that atom does not exist there.

    For a symbolic argument whose name contains "depth", the network is also built at the depths
    in :data:`SMALL_DEPTHS`: mass, sensitivity and sharpness become ``Piecewise`` in that symbol
    where the closed form misses a built value (so substitution gives the built value at every
    depth ≥ 1); ``valid_from`` is the smallest depth from which ``norm_coefficients`` describes the
    built network, and ``at_depth`` maps each smaller depth to ``describe`` of the built network.
    Raises ValueError, naming the reason, for constructions that need numbers."""
    module = _build(factory, kwargs)
    out = describe(module)
    depth_args = [k for k, v in kwargs.items()
                  if "depth" in k and isinstance(v, sympy.Symbol)]
    out["valid_from"] = 1
    out["at_depth"] = {}
    for name in depth_args:
        symbol = kwargs[name]
        built = {}
        for v in SMALL_DEPTHS:
            try:
                built[v] = describe(_build(factory, {**kwargs, name: v}))
            except ValueError:
                continue  # not a valid depth for this factory (e.g. an even-depth requirement)
        if not built:
            continue
        out["mass"] = _patch(out["mass"], {v: b["mass"] for v, b in built.items()}, symbol)
        out["sensitivity"] = _patch(out["sensitivity"], {v: b["sensitivity"] for v, b in built.items()}, symbol)
        for key in ("alpha", "beta", "gamma"):
            out["sharpness"][key] = _patch(out["sharpness"][key],
                                           {v: b["sharpness"][key] for v, b in built.items()}, symbol)
        mismatched = [v for v, b in built.items() if not _same_coefficients(out, b, symbol, v)]
        if mismatched:
            out["valid_from"] = max(out["valid_from"], max(mismatched) + 1)
            out["at_depth"].update({v: built[v] for v in built if v < out["valid_from"]})
    return out


def evaluate(expr, **values):
    """Substitute numbers for symbols by name, e.g. ``evaluate(p["mass"], d=128, L=4)``; a number
    (±∞ included) comes back as a float, anything still symbolic as an expression."""
    expr = sympy.sympify(expr)
    subs = {s: values[s.name] for s in expr.free_symbols if s.name in values}
    out = expr.subs(subs)
    if out.is_number:
        if out == sympy.oo:
            return float("inf")
        if out == -sympy.oo:
            return float("-inf")
        return float(out)
    return out
