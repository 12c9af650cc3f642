"""Manifold presets: put each atom of a network on a manifold by its role (or name)."""
from __future__ import annotations

import fnmatch

from .. import manifolds
from ..module import Atom

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


def _preset_choice(preset, role):
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


def assign_manifolds(net, preset) -> dict:
    """Move atoms of ``net`` onto manifolds (``atom.set_manifold`` retracts each weight onto it).

    ``preset``: "muon" (all Euclidean), "all-stiefel", "all-dgram", "hetero" (Stiefel attention,
    DGram MLP), "hetero-inv" (DGram attention, Stiefel MLP); or a dict {role or module-name glob:
    manifold name or Manifold}, first matching key wins. Embed/head/hyper-connection atoms are kept
    by presets; atoms with vector weights or whose ``allowed_manifolds`` excludes the choice are
    skipped. Returns {atom name: manifold name} of the atoms that were set.
    """
    if isinstance(preset, str):
        key = preset.lower()
        if key not in PRESETS:
            raise ValueError(f"assign_manifolds: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))} "
                             "(or a dict {role_or_name_glob: manifold})")

        def choose(name, atom):
            return _preset_choice(key, atom.role)
    elif isinstance(preset, dict):
        rules = [(str(k), manifolds.get(v)) for k, v in preset.items()]

        def choose(name, atom):
            for pattern, m in rules:
                if atom.role == pattern or fnmatch.fnmatch(name, pattern) or \
                        (atom.role is not None and fnmatch.fnmatch(atom.role, pattern)):
                    return m
            return None
    else:
        raise TypeError(f"assign_manifolds: preset must be a name or a dict, got {type(preset).__name__}")

    done = {}
    for name, atom in net.named_modules():
        if not isinstance(atom, Atom) or atom.weight is None or atom.weight.ndim < 2:
            continue
        choice = choose(name, atom)
        if choice is None:
            continue
        m = manifolds.get(choice)
        if atom.allowed_manifolds is not None and m.name not in atom.allowed_manifolds:
            continue
        atom.set_manifold(m)
        done[name or type(atom).__name__] = m.name
    return done
