"""Hot kernels: matrix sign (Polar Express), Sinkhorn–Knopp and mHC stream mixing.

Each has a PyTorch reference (``reference.py``, always importable, no triton needed) and a
Triton kernel (``triton_*.py``) used for CUDA tensors; ``dispatch.backend_for`` decides.
Orientation of the residual mix: ``h_res[..., i, j]`` weights input stream j in output stream i.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import backend_for, triton_available
from .gram_polar import gram_polar
from .reference import (
    POLAR_EXPRESS_COEFFS,
    SinkhornConvergenceWarning,
    polar_express_coeffs,
    sinkhorn_project,
    sinkhorn_tol_floor,
)

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "backend_for",
    "triton_available",
    "msign",
    "gram_polar",
    "sinkhorn",
    "sinkhorn_project",
    "sinkhorn_tol_floor",
    "SinkhornConvergenceWarning",
    "mhc_coeff_input",
    "mhc_pre",
    "mhc_post_res",
    "polar_express_coeffs",
]


def msign(X: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Polar factor U Vᵀ of X = U Σ Vᵀ by Polar Express; see ``reference.msign``."""
    if backend_for(X) == "triton":
        from .triton_msign import msign as msign_triton
        return msign_triton(X, steps)
    return reference.msign(X, steps)


def sinkhorn(logits: torch.Tensor, iters: int = 20, tol: float | None = None, max_iters: int = 1000,
             return_error: bool = False, nonconvergence: str = "warn"):
    """Doubly-stochastic Sinkhorn–Knopp(exp(logits)) with exact backward; see ``reference.sinkhorn``.

    ``tol`` mode iterates until the marginal error is below ``tol`` (at most ``max_iters``): a tol
    below ``sinkhorn_tol_floor(logits.dtype)`` raises ValueError, and stopping at the cap warns
    (``SinkhornConvergenceWarning``; ``nonconvergence="raise"`` or ``"ignore"`` to change that).
    The Triton kernel covers the fixed-iteration mode for n ≤ 16 (fp32/bf16/fp16); ``tol`` mode,
    float64 and larger n use the reference.
    """
    if tol is None and logits.dtype != torch.float64 and backend_for(logits) == "triton":
        from .triton_sinkhorn import MAX_N
        from .triton_sinkhorn import sinkhorn as sinkhorn_triton
        if logits.ndim >= 2 and logits.size(-1) == logits.size(-2) <= MAX_N:
            return sinkhorn_triton(logits, iters=iters, return_error=return_error)
    return reference.sinkhorn(logits, iters=iters, tol=tol, max_iters=max_iters, return_error=return_error,
                              nonconvergence=nonconvergence)


def mhc_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor):
    """(x_flat φ, Σ x_flat²) in fp32 in one pass over x; see ``reference.mhc_coeff_input``."""
    if backend_for(x_flat) == "triton":
        from .triton_mhc import mhc_coeff_input as f
        return f(x_flat, phi)
    return reference.mhc_coeff_input(x_flat, phi)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Σ_i h_pre_i x_i over the n streams; see ``reference.mhc_pre``."""
    if backend_for(x) == "triton":
        from .triton_mhc import mhc_pre as f
        return f(x, h_pre)
    return reference.mhc_pre(x, h_pre)


def mhc_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """out_i = Σ_j h_res[i, j] x_j + h_post_i f_out; see ``reference.mhc_post_res``."""
    if backend_for(x) == "triton":
        from .triton_mhc import mhc_post_res as f
        return f(x, f_out, h_res, h_post)
    return reference.mhc_post_res(x, f_out, h_res, h_post)
