"""Manifolds for weights: dualize (steepest unit tangent direction), then retract.

Every module file in this folder is imported and its public ``Manifold`` subclasses are exported;
a class that sets its own ``name`` is registered under it. A new manifold is one new file here
(no other edits), as for atoms and bonds. Shared bases (``Manifold``, ``GramManifold``) set no
name of their own and are not registered.

``get(name_or_manifold)`` turns "euclidean", "stiefel", "dgram", "oblique", "sphere", "birkhoff"
(any case) or a Manifold instance into a Manifold; ``register(name, cls)`` adds a plug-in from
outside the package.
"""
from __future__ import annotations

from .._plugins import export_subclasses
from .base import Manifold

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


def _register_named(classes) -> list[str]:
    """Register every Manifold subclass among ``classes`` that sets its own ``name`` (bases that
    only inherit one are skipped); returns the names registered."""
    done = []
    for cls in classes:
        if isinstance(cls, type) and issubclass(cls, Manifold) and cls is not Manifold and "name" in vars(cls):
            register(cls.name, cls)
            done.append(cls.name)
    return done


_exported = export_subclasses(__name__, __path__, Manifold, globals())
_register_named(globals()[n] for n in _exported)

__all__ = sorted(set(_exported)) + ["get", "names", "register"]
