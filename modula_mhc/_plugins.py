"""Plug-in discovery: a package exports every public subclass defined in its module files."""
from __future__ import annotations

import importlib
import pkgutil


def export_subclasses(package: str, path, base: type, namespace: dict) -> list:
    """Import every module of `package` and put its public `base` subclasses (and any names in a
    module's ``__all__``) into `namespace`; returns the exported names."""
    names = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        exported = getattr(mod, "__all__", None)
        if exported is None:
            exported = [n for n, v in vars(mod).items()
                        if isinstance(v, type) and issubclass(v, base) and v.__module__ == mod.__name__
                        and not n.startswith("_")]
        for n in exported:
            namespace[n] = getattr(mod, n)
            names.append(n)
    return names
