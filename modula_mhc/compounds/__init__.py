"""Compounds: networks built from atoms and bonds with the module algebra.

Every module file here is imported and its public ``Module`` subclasses (or names in its
``__all__``) are exported, so a new compound is one new file.
"""
from .._plugins import export_subclasses
from ..module import Module

__all__ = export_subclasses(__name__, __path__, Module, globals())
