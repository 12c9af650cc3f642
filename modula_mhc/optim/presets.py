"""Manifold presets: which manifold each role of a network gets (the one table of them).

``compounds.GPT(attn_manifold=, mlp_manifold=)`` (through the training config's ``manifolds``),
``modula_mhc.adapt(model, preset)`` and the examples read ``PRESETS``; to move one atom, call
``atom.set_manifold(m)``.
"""
from __future__ import annotations

import fnmatch

#: preset → (attention manifold, MLP manifold, manifold for atoms without a role or None to keep)
PRESETS = {
    "muon": ("euclidean", "euclidean", "euclidean"),
    "all-stiefel": ("stiefel", "stiefel", "stiefel"),
    "all-dgram": ("dgram", "dgram", "dgram"),
    "hetero": ("stiefel", "dgram", None),
    "hetero-inv": ("dgram", "stiefel", None),
}

#: roles that always stay Euclidean / on their own manifold (embeddings, head, hyper-connections)
KEPT_ROLES = ("embed", "head", "hc", "mix", "hyper_*")


def manifold_for_role(preset: str, role: str | None) -> str | None:
    """The manifold name ``preset`` gives an atom of this role (``attn_*``: attention, ``mlp_*``:
    MLP, None: the preset's third entry), or None to keep the atom's own (kept roles, others)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown manifold preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    attn, mlp, other = PRESETS[preset]
    if role is None:
        return other
    if any(fnmatch.fnmatch(role, k) for k in KEPT_ROLES):
        return None
    if role.startswith("attn"):
        return attn
    if role.startswith("mlp"):
        return mlp
    return None
