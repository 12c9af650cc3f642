"""Hot kernels: matrix sign (Polar Express), Sinkhorn–Knopp and mHC stream mixing.

Each has a PyTorch reference (``reference.py``, always importable, no triton needed) and a
Triton kernel (``triton_*.py``) used for CUDA tensors; ``dispatch.backend_for`` decides.
Orientation of the residual mix: ``h_res[..., i, j]`` weights input stream j in output stream i.
"""

from __future__ import annotations

import torch

from . import mhc_reference, reference
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
    reference._check_msign_input(X)
    if backend_for("msign", X) == "triton":
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
    if backend_for("sinkhorn", logits, tol=tol) == "triton":
        from .triton_sinkhorn import sinkhorn as sinkhorn_triton
        return sinkhorn_triton(logits, iters=iters, return_error=return_error)
    return reference.sinkhorn(logits, iters=iters, tol=tol, max_iters=max_iters, return_error=return_error,
                              nonconvergence=nonconvergence)


def _check_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor) -> None:
    if x_flat.ndim < 1 or phi.ndim != 2 or x_flat.size(-1) != phi.size(0):
        raise ValueError(f"mhc_coeff_input: expected x (..., K) and phi (K, m), got "
                         f"{tuple(x_flat.shape)} and {tuple(phi.shape)}")


def _check_pre(x: torch.Tensor, h_pre: torch.Tensor) -> None:
    if x.ndim < 2 or h_pre.shape != x.shape[:-1]:
        raise ValueError(f"mhc_pre: expected x (..., n, C) and h_pre (..., n), got "
                         f"{tuple(x.shape)} and {tuple(h_pre.shape)}")


def _check_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> None:
    if x.ndim < 2:
        raise ValueError(f"mhc_post_res: expected x (..., n, C), got {tuple(x.shape)}")
    lead, n, C = x.shape[:-2], x.size(-2), x.size(-1)
    if f_out.shape != (*lead, C) or h_res.shape != (*lead, n, n) or h_post.shape != (*lead, n):
        raise ValueError(f"mhc_post_res: shapes do not match x {tuple(x.shape)}: f_out {tuple(f_out.shape)}, "
                         f"h_res {tuple(h_res.shape)}, h_post {tuple(h_post.shape)}")


def mhc_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor):
    """(x_flat φ, Σ x_flat²): x_flat (..., n·C), φ (n·C, m) → (..., m), (...), in fp32 (fp64 for fp64
    x) in one pass over x; see ``mhc_reference.mhc_coeff_input``."""
    _check_coeff_input(x_flat, phi)
    if backend_for("mhc_coeff_input", x_flat, phi) == "triton":
        from .triton_mhc import mhc_coeff_input as f
        return f(x_flat, phi)
    return mhc_reference.mhc_coeff_input(x_flat, phi)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Σ_i h_pre_i x_i over the n streams: x (..., n, C), h_pre (..., n) → (..., C)."""
    _check_pre(x, h_pre)
    if backend_for("mhc_pre", x, h_pre) == "triton":
        from .triton_mhc import mhc_pre as f
        return f(x, h_pre)
    return mhc_reference.mhc_pre(x, h_pre)


def mhc_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """out_i = Σ_j h_res[i, j] x_j + h_post_i f_out: x (..., n, C), f_out (..., C), h_res (..., n, n),
    h_post (..., n) → (..., n, C)."""
    _check_post_res(x, f_out, h_res, h_post)
    if backend_for("mhc_post_res", x, f_out, h_res, h_post) == "triton":
        from .triton_mhc import mhc_post_res as f
        return f(x, f_out, h_res, h_post)
    return mhc_reference.mhc_post_res(x, f_out, h_res, h_post)
