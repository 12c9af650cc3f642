"""Analytic queries: a network's mass, sensitivity, sharpness and norm coefficients as sympy
expressions in its width, depth, heads, context, ….

Pass sympy symbols for any constructor argument; atoms with a symbolic dimension allocate no
tensors and ``M ** L`` with a symbolic L uses closed forms, so the same construction code that
builds a network also describes it. Substituting numbers gives the built network's values
(tests check this).

>>> import sympy, modula_mhc as mm
>>> d, L = sympy.symbols("d L", positive=True, integer=True)
>>> p = mm.symbolic.properties(mm.compounds.ResMLP, in_features=784, out_features=10, width=d, depth=L)
>>> p["sensitivity"]
"""
from __future__ import annotations

import sympy

from ..algebra import SymbolicRepeat
from ..module import Module

__all__ = ["properties", "describe", "layer_index", "evaluate"]

#: symbol used for the position (1 = nearest the input) of a block inside ``M ** L``
layer_index = SymbolicRepeat.layer_index


def _expr(v):
    return sympy.simplify(sympy.sympify(v))


def describe(module: Module) -> dict:
    """Properties of an already constructed (possibly symbolic) module as sympy expressions."""
    sharp = module.sharpness
    names = {m: n for n, m in module.named_modules()}
    coeffs = module._coefficient_map()
    return {
        "mass": _expr(module.mass),
        "sensitivity": _expr(module.sensitivity),
        "sharpness": {"alpha": _expr(sharp.alpha), "beta": _expr(sharp.beta), "gamma": _expr(sharp.gamma)},
        "norm_coefficients": {names.get(a, repr(a)): {"role": a.role, "coefficient": _expr(c)}
                              for a, c in coeffs.items()},
    }


def properties(factory, /, **kwargs) -> dict:
    """Build ``factory(**kwargs)`` (a compound class or any function returning a Module) with
    symbolic arguments and return {"mass", "sensitivity", "sharpness": {alpha, beta, gamma},
    "norm_coefficients": {atom path: {role, coefficient}}} as sympy expressions. A coefficient
    inside ``M ** L`` depends on :data:`layer_index` l."""
    module = factory(**kwargs)
    if not isinstance(module, Module):
        raise TypeError(f"{factory!r} did not return a modula_mhc Module")
    return describe(module)


def evaluate(expr, **values):
    """Substitute numbers for symbols by name, e.g. ``evaluate(p["mass"], d=128, L=4)``."""
    expr = sympy.sympify(expr)
    subs = {s: values[s.name] for s in expr.free_symbols if s.name in values}
    out = expr.subs(subs)
    return float(out) if out.is_number else out
