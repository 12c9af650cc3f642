"""Bonds: modules without weights (activations, norms, shape ops, attention pieces).

Every module file here is imported and its public ``Bond`` subclasses are exported, so a new
bond is one new file (no other edits).
"""
from .._plugins import export_subclasses
from ..algebra import Identity
from ..module import Bond

__all__ = ["Identity"] + export_subclasses(__name__, __path__, Bond, globals())
