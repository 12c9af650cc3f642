"""Arithmetic that works on Python numbers and on sympy expressions alike.

Mass, sensitivity and sharpness are plain floats for a built network and sympy expressions
when a network is described with symbolic width or depth (see :mod:`modula_mhc.symbolic`).
Every formula in the module algebra goes through these helpers so that one code path serves
both.
"""
from __future__ import annotations

import math
from numbers import Number

import sympy

INF = math.inf


def is_symbolic(*values) -> bool:
    """True if any value is a sympy expression that is not a plain number."""
    for v in values:
        if isinstance(v, sympy.Basic) and not v.is_number:
            return True
    return False


def is_number(v) -> bool:
    return isinstance(v, Number) or (isinstance(v, sympy.Basic) and v.is_number)


def to_number(v):
    """Collapse a numeric sympy value to a Python float (symbolic values pass through)."""
    if isinstance(v, sympy.Basic) and v.is_number:
        if v in (sympy.oo, -sympy.oo) or v.is_infinite:
            return INF if v > 0 else -INF
        return float(v)
    return v


def is_zero(v) -> bool:
    """Exactly zero (symbolic expressions are treated as non-zero)."""
    if is_symbolic(v):
        return False
    return to_number(v) == 0


def sqrt(v):
    return sympy.sqrt(v) if isinstance(v, sympy.Basic) else math.sqrt(v)


def absolute(v):
    return sympy.Abs(v) if isinstance(v, sympy.Basic) else abs(v)


def maximum(*vs):
    if any(isinstance(v, sympy.Basic) for v in vs):
        return sympy.Max(*vs)
    return max(vs)


def infinity(like=None):
    return sympy.oo if isinstance(like, sympy.Basic) else INF


def fraction(num, den, like=None):
    """num/den as an exact Rational when `like` (or den) is symbolic, else a float."""
    if isinstance(like, sympy.Basic) or isinstance(den, sympy.Basic) or isinstance(num, sympy.Basic):
        return sympy.Rational(num, den) if isinstance(num, int) and isinstance(den, int) else sympy.sympify(num) / den
    return num / den


def simplify(v):
    return sympy.simplify(v) if isinstance(v, sympy.Basic) else v


def product(*factors):
    """Product in which an exact zero wins over infinity (0·∞ = 0)."""
    if any(is_zero(f) for f in factors):
        return 0.0
    out = 1.0
    for f in factors:
        out = out * f
    return out
