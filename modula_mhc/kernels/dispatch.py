"""Choose between the Triton kernels and the PyTorch references, in one place.

Rule: ``MODULA_MHC_KERNELS=reference`` forces the reference; ``MODULA_MHC_KERNELS=triton`` forces
Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``, used by the tests); otherwise Triton is
used for CUDA tensors when triton imports, and the reference everywhere else.
"""

from __future__ import annotations

import functools
import os

import torch

ENV_VAR = "MODULA_MHC_KERNELS"
_CHOICES = ("", "auto", "reference", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # triton missing or broken: the references still work
        return False
    return True


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of 'reference', 'triton', 'auto' or unset")
    return value


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "reference" for an operation whose main input is ``t`` (see module docstring)."""
    requested = _requested()
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported")
        return "triton"
    return "triton" if (t.is_cuda and triton_available()) else "reference"
