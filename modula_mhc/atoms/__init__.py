"""Atoms: modules that own one weight living on a manifold.

Every module file in this folder is imported and its public ``Atom`` subclasses are exported,
so a new atom is one new file here (no other edits).
"""
from .._plugins import export_subclasses
from ..module import Atom

__all__ = export_subclasses(__name__, __path__, Atom, globals())
