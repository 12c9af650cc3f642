"""Choose between the Triton kernels and the PyTorch references, in one place.

Rule: ``MODULA_MHC_KERNELS=reference`` forces the reference; ``MODULA_MHC_KERNELS=triton`` asks
for Triton everywhere (on CPU tensors this needs ``TRITON_INTERPRET=1``, used by the tests);
otherwise Triton is a candidate for CUDA tensors when triton imports. A candidate runs only where
its module's ``supports(...)`` predicate accepts the input (dtype, size, mode): float64, a Sinkhorn
tolerance mode or n > 16 fall back to the reference here, and nowhere else. Unless Triton is
forced, a module may also offer ``preferred(...)``: where it says no, the reference is the faster
(measured) and runs instead (msign: small or float32 stacks).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

ENV_VAR = "MODULA_MHC_KERNELS"
_CHOICES = ("", "auto", "reference", "triton")
#: the Triton module of each public kernel (each offers ``supports(...)`` and the kernel itself)
TRITON_MODULES = {"msign": "triton_msign", "sinkhorn": "triton_sinkhorn", "mhc_coeff_input": "triton_mhc",
                  "mhc_pre": "triton_mhc", "mhc_post_res": "triton_mhc", "mhc_layer": "triton_mhc"}


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


def triton_module(kernel: str):
    """The Triton module implementing ``kernel`` (imported on first use: it needs triton)."""
    return importlib.import_module(f"{__package__}.{TRITON_MODULES[kernel]}")


def backend_for(kernel: str, t: torch.Tensor, *others: torch.Tensor, **options) -> str:
    """"triton" or "reference" for ``kernel`` on main input ``t`` (``others`` and ``options``: the
    rest of its inputs and modes, passed to the Triton module's ``supports``); see the module docstring."""
    if kernel not in TRITON_MODULES:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(TRITON_MODULES)}")
    requested = _requested()
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported")
    elif not (_on_gpu(t) and triton_available()):
        return "reference"
    module = triton_module(kernel)
    if not module.supports(t, *others, **options):
        return "reference"
    preferred = getattr(module, "preferred", None)
    return "reference" if requested != "triton" and preferred is not None and not preferred(t) else "triton"


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def fused_layer(x: torch.Tensor) -> bool:
    """Whether ``mhc_layer`` runs the reference's fused layer (two autograd nodes, one gradient
    buffer) rather than composing the three mixing kernels: on the reference backend, with
    gradients on, in eager mode (torch.compile traces the composition and fuses it itself)."""
    return (backend_for("mhc_layer", x) == "reference" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())
