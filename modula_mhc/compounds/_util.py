"""Helpers shared by the compounds."""
from __future__ import annotations

from .. import bonds
from .. import scalars as S
from ..module import Bond, Module

ACTIVATIONS = {"relu": bonds.ReLU, "gelu": bonds.GELU, "silu": bonds.SiLU, "abs": bonds.Abs}


def activation(spec) -> Bond:
    """A fresh activation bond from a name ("relu", "gelu", "silu", "abs"), a Bond class or instance."""
    if isinstance(spec, str):
        try:
            return ACTIVATIONS[spec.lower()]()
        except KeyError:
            raise ValueError(f"unknown activation {spec!r}; known: {sorted(ACTIVATIONS)}") from None
    if isinstance(spec, type) and issubclass(spec, Bond):
        return spec()
    if isinstance(spec, Bond):
        return type(spec)()
    raise TypeError(f"activation must be a name, a Bond class or a Bond, got {spec!r}")


def is_count(v) -> bool:
    """An int ≥ 1 that is not a bool (True == 1 would silently mean one)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def is_positive_integer(value) -> bool:
    """A number equal to an integer ≥ 1 (2.0 passes), never a bool (True == 1 would silently mean one)."""
    return not isinstance(value, bool) and S.is_number(value) and int(value) == value and value >= 1


def check_positive_int(name, value, allow_symbolic=True):
    """Raise ValueError unless value is an integer ≥ 1 (or symbolic). A bool is refused: True == 1
    would silently build, e.g., a depth-1 GPT."""
    if allow_symbolic and S.is_symbolic(value):
        return
    if not is_positive_integer(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def set_total_mass(module: Module, total):
    """Rescale the masses of a module's atoms so that they sum to `total` (relative shares kept)."""
    atoms = module.atoms()
    current = sum((a.mass for a in atoms), 0)
    if S.is_zero(current):
        return module
    for a in atoms:
        a.mass = a.mass * total / current
    return module
