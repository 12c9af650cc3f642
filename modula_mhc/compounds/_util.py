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


def check_positive_int(name, value, allow_symbolic=True):
    if allow_symbolic and S.is_symbolic(value):
        return
    if not S.is_number(value) or int(value) != value or value < 1:
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
