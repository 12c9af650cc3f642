"""Arithmetic that works on Python numbers and on sympy expressions alike.

Mass, sensitivity and sharpness are plain floats for a built network and sympy expressions
when a network is described with symbolic width or depth (see :mod:`modula_mhc.symbolic`).
Every formula in the module algebra goes through these helpers so that one code path serves
both.

sympy is never imported here: a value can only be a sympy object once the caller has imported
sympy (to make a symbol), so until then every value is a plain number and ``import modula_mhc``
stays free of sympy's import time.
"""
from __future__ import annotations

import math
import sys
from numbers import Number

INF = math.inf


def _sympy_basic():
    """sympy.Basic if sympy has been imported by someone, else None (then nothing is symbolic)."""
    sympy = sys.modules.get("sympy")
    return getattr(sympy, "Basic", None)


def _is_sympy(v) -> bool:
    basic = _sympy_basic()
    return basic is not None and isinstance(v, basic)


def is_symbolic(*values) -> bool:
    """True if any value is a sympy expression that is not a plain number."""
    return any(_is_sympy(v) and not v.is_number for v in values)


def is_number(v) -> bool:
    """True for a finite real number (int, float or numeric sympy value) that fits in a float.

    NaN, ±∞, complex values and integers beyond float range are not numbers here: every caller
    uses this to validate a width, a depth, a mass or a scale, where those would only fail later
    (OverflowError, NaN weights) far from the argument that caused it."""
    if isinstance(v, complex):
        return False
    if isinstance(v, Number) or (_is_sympy(v) and v.is_number and v.is_real):
        try:
            return math.isfinite(float(v))
        except (OverflowError, TypeError, ValueError):
            return False
    return False


def to_number(v):
    """Collapse a numeric sympy value to a Python float (symbolic values pass through)."""
    if _is_sympy(v) and v.is_number:
        if v.is_infinite:
            return INF if v > 0 else -INF
        return float(v)
    return v


def is_zero(v) -> bool:
    """Exactly zero (symbolic expressions are treated as non-zero)."""
    if is_symbolic(v):
        return False
    return to_number(v) == 0


def sqrt(v):
    """√v for a number (float) or a sympy expression."""
    return sys.modules["sympy"].sqrt(v) if _is_sympy(v) else math.sqrt(v)


def absolute(v):
    """|v| for a number or a sympy expression."""
    return sys.modules["sympy"].Abs(v) if _is_sympy(v) else abs(v)


def maximum(*vs):
    """max(vs), a sympy Max when any of them is a sympy expression."""
    if any(_is_sympy(v) for v in vs):
        return sys.modules["sympy"].Max(*vs)
    return max(vs)


def one(like=None):
    """1 as sympy.Integer(1) when `like` is symbolic (keeps results exact), else 1.0."""
    return sys.modules["sympy"].Integer(1) if is_symbolic(like) else 1.0


def infinity(like=None):
    """∞ of the same kind as `like` (sympy.oo for a sympy value, else math.inf)."""
    return sys.modules["sympy"].oo if _is_sympy(like) else INF


def fraction(num, den, like=None):
    """num/den as an exact Rational when `like` (or den) is symbolic, else a float."""
    if _is_sympy(like) or _is_sympy(den) or _is_sympy(num):
        sympy = sys.modules["sympy"]
        return sympy.Rational(num, den) if isinstance(num, int) and isinstance(den, int) else sympy.sympify(num) / den
    return num / den


def product(*factors):
    """Product in which an exact zero wins over infinity (0·∞ = 0)."""
    if any(is_zero(f) for f in factors):
        return 0.0
    out = 1.0
    for f in factors:
        out = out * f
    return out


def checked_mass(owner: str, mass):
    """``mass`` if it is a finite number >= 0 or a sympy expression; ValueError otherwise (a NaN or
    infinite mass would turn every norm coefficient, and then every weight, into NaN)."""
    if not is_symbolic(mass) and not (is_number(mass) and to_number(mass) >= 0):
        raise ValueError(f"{owner}: mass must be a finite number >= 0, got {mass!r}")
    return mass
