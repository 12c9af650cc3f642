"""Tile shapes of the Triton kernels: autotuned on a GPU, fixed under the interpreter.

On a GPU a kernel is timed over a few tile configurations on first use for each shape key
(``triton.autotune``) and the fastest is kept. The tiles each kernel shipped with are the first
candidate, so tuning only ever replaces them by a configuration measured faster on that card
(the msign symmetric product: 6.71 → 4.58 ms at 4096² bf16 on an H100). Under TRITON_INTERPRET=1
every candidate would run in the slow interpreter, so the shipped tiles are used there, and
``force_config`` lets the tests run every candidate once on small ragged shapes.

Tuning chooses by timing, so two runs may pick different tiles and sum in a different order (the
results agree to rounding, not bit for bit). ``MODULA_MHC_AUTOTUNE=0`` keeps the shipped tiles
everywhere, for runs that must repeat bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import triton

_forced: list[int] = []


AUTOTUNE_VAR = "MODULA_MHC_AUTOTUNE"


def autotuning() -> bool:
    """False when ``MODULA_MHC_AUTOTUNE`` is 0/false/off/no: every kernel keeps its shipped tiles."""
    value = os.environ.get(AUTOTUNE_VAR, "1").strip().lower()
    if value not in ("", "1", "0", "true", "false", "on", "off", "yes", "no"):
        raise ValueError(f"{AUTOTUNE_VAR}={value!r}: expected 1 or 0")
    return value not in ("0", "false", "off", "no")


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1: CPU tensors, no compilation)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def force_config(index: int):
    """Launch every ``Tiled`` kernel with its ``index``-th candidate (the last one where it has
    fewer) inside the block: how the tests check that each candidate computes the same thing."""
    _forced.append(index)
    try:
        yield
    finally:
        _forced.pop()


class Tiled:
    """A Triton kernel with two tile meta-parameters ``names``: its ``shipped`` values and more
    ``candidates`` ((first, second, num_warps, num_stages) tuples), autotuned over all of them on
    a GPU per ``key``."""

    def __init__(self, kernel, names: tuple[str, str], shipped: tuple[int, int],
                 candidates: list[tuple[int, int, int, int]], key: list[str]):
        self.kernel = kernel
        self.fixed = dict(zip(names, shipped))
        self.configs = [triton.Config(dict(self.fixed), num_warps=4, num_stages=3)] + \
            [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s) for a, b, w, s in candidates]
        self._tuned = triton.autotune(configs=self.configs, key=key)(kernel)

    def launch(self, grid: Callable[[dict], tuple], *args, shipped: dict | None = None, **kwargs) -> None:
        """Run the kernel on ``grid(meta)`` programs: the forced candidate if any; the shipped tiles
        (``shipped`` for this call, else ``fixed``) under the interpreter or with autotuning off;
        else the tuned choice."""
        if _forced:
            cfg = self.configs[min(_forced[-1], len(self.configs) - 1)]
            self.kernel[grid(cfg.kwargs)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        elif interpreting() or not autotuning():
            meta = shipped or self.fixed
            self.kernel[grid(meta)](*args, **kwargs, **meta)
        else:
            self._tuned[grid](*args, **kwargs)
