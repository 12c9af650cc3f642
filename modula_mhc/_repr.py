"""A compact ``repr`` for modules built with the algebra.

``nn.Module.__repr__`` prints every container level: a 2-block GPT took 62 lines, most of them
``(layers): ModuleList(`` and ``(branches): ModuleList(``. Here containers are spliced into their
parent, a scaled module prints as ``a × M`` and numbers are rounded, so the structure (what is
composed with what, each atom's shape, mass and role) reads at a glance. Parameter names
(``named_parameters``, state-dict keys) are unchanged: they follow the attribute tree.
"""
from __future__ import annotations

from numbers import Real

from torch import nn


def short_number(v) -> str:
    """A float at 4 significant digits (0.4166666666666667 → 0.4167); anything else as str()."""
    if isinstance(v, Real) and not isinstance(v, (bool, int)):
        return f"{float(v):.4g}"
    return str(v)


def _children(module: nn.Module) -> list:
    """(label, child) pairs with ModuleLists spliced in (their items labelled by index)."""
    out = []
    for name, child in module.named_children():
        if type(child) is nn.ModuleList:
            out += [(str(i), c) for i, c in enumerate(child)]
        else:
            out.append((name, child))
    return out


def _scaled(module: nn.Module):
    """(factor, inner module) for a scalar multiple a·M (the algebra's Scale), else None."""
    inner = getattr(module, "module", None)
    if hasattr(module, "a") and isinstance(inner, nn.Module) and len(module._modules) == 1:
        return module.a, inner
    return None


def _lines(module: nn.Module) -> list:
    scaled = _scaled(module)
    if scaled is not None:
        a, inner = scaled
        body = _lines(inner)
        return [f"{short_number(a)} × {body[0]}"] + body[1:]
    head = module._get_name()
    extra = module.extra_repr()
    children = _children(module)
    if not children:
        return [f"{head}({extra})"]
    out = [f"{head}({extra}," if extra else f"{head}("]
    rendered = [(label, _lines(child)) for label, child in children]
    i = 0
    while i < len(rendered):  # identical consecutive children print once, as torch does: (1-2): 2 x Block(
        j = i
        while j + 1 < len(rendered) and rendered[j + 1][1] == rendered[i][1]:
            j += 1
        label = rendered[i][0] if i == j else f"{rendered[i][0]}-{rendered[j][0]}"
        count = "" if i == j else f"{j - i + 1} x "
        first, *rest = rendered[i][1]
        out.append(f"  ({label}): {count}{first}")
        out += ["  " + line for line in rest]
        i = j + 1
    out.append(")")
    return out


def compact_repr(module: nn.Module) -> str:
    """The module tree, one line per module, containers spliced into their parents."""
    return "\n".join(_lines(module))
