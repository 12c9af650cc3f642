"""Atoms: modules that own one weight living on a manifold.

Coming from ``torch.nn``: ``Linear(in, out)`` scales its output by √(out/in) (its weight sits at
unit spectral scale), so it is not a drop-in ``nn.Linear``; ``Linear(..., bias=True)`` returns the
compound ``Linear + Bias`` (a ``Sum``). ``Embed`` is ``nn.Embedding`` with unit-RMS rows.

Every module file in this folder is imported and its public ``Atom`` subclasses are exported,
so a new atom is one new file here (no other edits).
"""
from .._plugins import export_subclasses
from ..module import Atom

__all__ = export_subclasses(__name__, __path__, Atom, globals())
