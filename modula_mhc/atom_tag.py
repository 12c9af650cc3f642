"""The tag that says which atom a weight belongs to (``weight._mm_atom``, read by the optimizer)."""
from __future__ import annotations

import weakref


class AtomTag(weakref.ref):
    """The ``_mm_atom`` tag on an atom's weight: a weak reference to the atom (what DualizeRetract
    reads). It pickles and deep-copies as None, so ``torch.save(model)``, ``pickle`` and
    ``copy.deepcopy`` work; the copied atom tags its own weight again (``Atom.__setstate__``)."""

    __slots__ = ()

    def __reduce_ex__(self, protocol):
        return (_no_tag, ())

    def __deepcopy__(self, memo):
        return None


def _no_tag():
    return None
