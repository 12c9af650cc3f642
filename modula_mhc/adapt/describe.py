"""``describe()``: the table a person reads to see what adapt inferred."""
from __future__ import annotations

from .. import scalars as S

__all__ = ["rows", "table"]

COLUMNS = ("parameter", "shape", "role", "manifold", "mass", "norm coef", "structure")


def rows(adapted) -> list[dict]:
    """One dict per atom view: the COLUMNS plus ``note``."""
    out = []
    for a, c in zip(adapted.atoms(), adapted.norm_coefficients()):
        c = S.to_number(c)
        role = a.role or "-"
        pieces = getattr(a, "pieces", None)
        if pieces is not None and len(pieces) > 1:
            role += f" ({len(a.segments)} proj" + (f", {len(pieces)} heads)" if len(pieces) > len(a.segments) else ")")
        native = not hasattr(a, "structure")
        out.append({"parameter": adapted.name_of(a), "shape": "×".join(str(s) for s in a.shape), "role": role,
                    "manifold": a.manifold.name, "mass": f"{float(S.to_number(a.mass)):.3g}",
                    "norm coef": "inf" if c == S.INF else f"{c:.3g}", "structure": "native" if native else a.structure,
                    "note": f"{type(a).__name__} of a modula_mhc module" if native else a.note})
    return out


def table(adapted) -> str:
    """A fixed-width text table (with a one-line summary of the recovered structure)."""
    data = rows(adapted)
    cols = list(COLUMNS)
    width = {k: max(len(k), *(len(r[k]) for r in data)) if data else len(k) for k in cols}
    line = "  ".join(k.ljust(width[k]) for k in cols)
    sep = "  ".join("-" * width[k] for k in cols)
    body = ["  ".join(r[k].ljust(width[k]) for k in cols) + (f"  # {r['note']}" if r["note"] else "") for r in data]
    head = [f"{type(adapted.model).__name__}: {adapted.structure_summary}",
            f"mass {float(S.to_number(adapted.mass)):.4g}, sensitivity {adapted.sensitivity_text()}"]
    return "\n".join(head + [line, sep] + body)
