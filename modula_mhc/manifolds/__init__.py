"""Manifolds for weights: dualize (steepest unit tangent direction), then retract.

``get(name_or_manifold)`` turns "euclidean", "stiefel", "dgram", "oblique", "sphere", "birkhoff"
(any case) or a Manifold instance into a Manifold; ``register(name, cls)`` adds a plug-in.
"""
from __future__ import annotations

from .base import Manifold
from .birkhoff import Birkhoff
from .dgram import DGram
from .euclidean import Euclidean
from .oblique import Oblique
from .sphere import Sphere
from .stiefel import Stiefel

_REGISTRY: dict[str, type] = {}


def register(name: str, cls: type) -> type:
    """Make ``get(name)`` return ``cls()``; ``cls`` must subclass Manifold. Returns cls."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"manifolds.register: name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Manifold)):
        raise TypeError(f"manifolds.register: {cls!r} is not a Manifold subclass")
    _REGISTRY[name.lower()] = cls
    return cls


def names() -> list[str]:
    """Registered manifold names."""
    return sorted(_REGISTRY)


def get(manifold) -> Manifold:
    """A Manifold from a registered name (case-insensitive), a Manifold subclass or an instance."""
    if isinstance(manifold, Manifold):
        return manifold
    if isinstance(manifold, type) and issubclass(manifold, Manifold):
        return manifold()
    if isinstance(manifold, str):
        cls = _REGISTRY.get(manifold.lower())
        if cls is not None:
            return cls()
    raise ValueError(f"unknown manifold {manifold!r}; known names: {', '.join(names())} "
                     f"(or pass a Manifold instance)")


for _cls in (Euclidean, Stiefel, DGram, Oblique, Sphere, Birkhoff):
    register(_cls.name, _cls)

__all__ = ["Manifold", "Euclidean", "Stiefel", "DGram", "Oblique", "Sphere", "Birkhoff", "get", "register", "names"]
