"""Tile shapes of the Triton kernels: autotuned on a GPU, fixed under the interpreter.

On a GPU a kernel is timed over a few tile configurations on first use for each shape key
(``triton.autotune``) and the fastest is kept. The tiles each kernel shipped with are the first
candidate, so tuning only ever replaces them by a configuration measured faster on that card
(the msign symmetric product: 6.71 → 4.58 ms at 4096² bf16 on an H100). Under TRITON_INTERPRET=1
every candidate would run in the slow interpreter, so the shipped tiles are used there, and
``force_config`` lets the tests run every candidate once on small ragged shapes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import triton

_forced: list[int] = []


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
    """A Triton kernel with its shipped tile meta-parameters ``fixed`` and more ``candidates``
    ((meta, num_warps, num_stages) triples), autotuned over all of them on a GPU per ``key``."""

    def __init__(self, kernel, fixed: dict, candidates: list[tuple[dict, int, int]], key: list[str]):
        self.kernel = kernel
        self.fixed = dict(fixed)
        self.configs = [triton.Config(dict(fixed), num_warps=4, num_stages=3)] + \
            [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in candidates]
        self._tuned = triton.autotune(configs=self.configs, key=key)(kernel)

    def launch(self, grid: Callable[[dict], tuple], *args, interpreter_meta: dict | None = None, **kwargs) -> None:
        """Run the kernel on ``grid(meta)`` programs: the forced candidate, else the shipped tiles
        (or ``interpreter_meta``) under the interpreter, else the tuned choice."""
        if _forced:
            cfg = self.configs[min(_forced[-1], len(self.configs) - 1)]
            self.kernel[grid(cfg.kwargs)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        elif interpreting():
            meta = interpreter_meta or self.fixed
            self.kernel[grid(meta)](*args, **kwargs, **meta)
        else:
            self._tuned[grid](*args, **kwargs)
