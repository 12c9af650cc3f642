"""Hot kernels: matrix sign (Polar Express), Sinkhorn–Knopp and mHC stream mixing.

Each has a PyTorch reference (``reference.py`` and the modules it re-exports, always importable,
no triton needed) and a Triton kernel (``triton_*.py``) used for CUDA tensors. The public functions
here are the one entry point: each validates its arguments once, then ``dispatch.backend_for``
picks the backend (the Triton module's ``supports`` predicate decides what it can run).
Orientation of the residual mix: ``h_res[..., i, j]`` weights input stream j in output stream i.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import mhc_reference, reference, sinkhorn_reference
from .dispatch import backend_for, fused_layer, triton_available, triton_module
from .gram_polar import gram_polar
from .reference import POLAR_EXPRESS_COEFFS, polar_express_coeffs
from .sinkhorn_reference import NONCONVERGENCE, SinkhornConvergenceWarning, compute_dtype, sinkhorn_tol_floor

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
    "mhc_layer",
    "polar_express_coeffs",
]


# --------------------------------------------------------------------------------------------
# Input contracts: every public function checks its arguments here, once, before dispatching
# --------------------------------------------------------------------------------------------


_MSIGN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_msign(X: torch.Tensor) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"msign: expected a torch.Tensor, got {type(X).__name__}")
    if X.ndim < 2:
        raise ValueError(f"msign: expected shape (..., m, n), got {tuple(X.shape)}")
    if X.dtype not in _MSIGN_DTYPES:
        raise TypeError(f"msign: unsupported dtype {X.dtype}; use float32, bfloat16, float16 or float64")


def _check_sinkhorn(logits: torch.Tensor, iters: int, tol, max_iters: int, nonconvergence="warn") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"sinkhorn: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 2 or logits.size(-1) != logits.size(-2):
        raise ValueError(f"sinkhorn: expected shape (..., n, n), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"sinkhorn: expected floating-point logits, got {logits.dtype}")
    if tol is None:
        if not isinstance(iters, int) or iters < 1:
            raise ValueError(f"sinkhorn: iters must be a positive int, got {iters!r}")
    else:
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"sinkhorn: tol must be a positive number or None, got {tol!r}")
        if not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"sinkhorn: max_iters must be a positive int, got {max_iters!r}")
        floor = sinkhorn_tol_floor(logits.dtype)
        if tol < floor:
            acc = compute_dtype(logits.dtype)
            raise ValueError(f"sinkhorn: tol={tol:g} is below what {str(acc).replace('torch.', '')} arithmetic "
                             f"can reach for {str(logits.dtype).replace('torch.', '')} logits (floor {floor:.3g}: "
                             "row sums carry that much rounding); use tol >= the floor, or float64 logits")
    if nonconvergence not in NONCONVERGENCE:
        raise ValueError(f"sinkhorn: nonconvergence must be one of {NONCONVERGENCE}, got {nonconvergence!r}")


def _check_floating(fn: str, **tensors) -> None:
    """The mixing kernels compute in the inputs' dtype: integer or bool tensors would truncate the
    coefficients (an int64 x with h_pre = 0.25 gave zeros), so they are refused, not cast."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: expected a floating-point {name}, got {t.dtype}")


def _check_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor) -> None:
    _check_floating("mhc_coeff_input", x_flat=x_flat, phi=phi)
    if x_flat.ndim < 1 or phi.ndim != 2 or x_flat.size(-1) != phi.size(0):
        raise ValueError(f"mhc_coeff_input: expected x (..., K) and phi (K, m), got "
                         f"{tuple(x_flat.shape)} and {tuple(phi.shape)}")


def _check_pre(x: torch.Tensor, h_pre: torch.Tensor) -> None:
    _check_floating("mhc_pre", x=x, h_pre=h_pre)
    if x.ndim < 2 or h_pre.shape != x.shape[:-1]:
        raise ValueError(f"mhc_pre: expected x (..., n, C) and h_pre (..., n), got "
                         f"{tuple(x.shape)} and {tuple(h_pre.shape)}")


def _check_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> None:
    _check_floating("mhc_post_res", x=x, f_out=f_out, h_res=h_res, h_post=h_post)
    if x.ndim < 2:
        raise ValueError(f"mhc_post_res: expected x (..., n, C), got {tuple(x.shape)}")
    lead, n, C = x.shape[:-2], x.size(-2), x.size(-1)
    if f_out.shape != (*lead, C) or h_res.shape != (*lead, n, n) or h_post.shape != (*lead, n):
        raise ValueError(f"mhc_post_res: shapes do not match x {tuple(x.shape)}: f_out {tuple(f_out.shape)}, "
                         f"h_res {tuple(h_res.shape)}, h_post {tuple(h_post.shape)}")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def msign(X: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Polar factor U Vᵀ of X = U Σ Vᵀ by Polar Express; see ``reference.msign``."""
    _check_msign(X)
    if backend_for("msign", X) == "triton":
        return triton_module("msign").msign(X, steps)
    return reference.msign(X, steps)


def sinkhorn(logits: torch.Tensor, iters: int = 20, tol: float | None = None, max_iters: int = 1000,
             return_error: bool = False, nonconvergence: str = "warn"):
    """Doubly-stochastic Sinkhorn–Knopp(exp(logits)) with exact backward; see
    ``sinkhorn_reference.sinkhorn``.

    ``tol`` mode iterates until the marginal error is below ``tol`` (at most ``max_iters``): a tol
    below ``sinkhorn_tol_floor(logits.dtype)`` raises ValueError, and stopping at the cap warns
    (``SinkhornConvergenceWarning``; ``nonconvergence="raise"`` or ``"ignore"`` to change that).
    The Triton kernel covers the fixed-iteration mode for n ≤ 16 (fp32/bf16/fp16); ``tol`` mode,
    float64 and larger n use the reference.
    """
    _check_sinkhorn(logits, iters, tol, max_iters, nonconvergence)
    if backend_for("sinkhorn", logits, tol=tol) == "triton":
        return triton_module("sinkhorn").sinkhorn(logits, iters=iters, return_error=return_error)
    return sinkhorn_reference.sinkhorn(logits, iters=iters, tol=tol, max_iters=max_iters,
                                       return_error=return_error, nonconvergence=nonconvergence)


def sinkhorn_project(W: torch.Tensor, iters: int = 20, tol: float | None = 1e-5, max_iters: int = 1000,
                     return_error: bool = False, nonconvergence: str = "warn"):
    """Project a strictly positive matrix onto the doubly-stochastic set: ``sinkhorn(log W)``.

    Sinkhorn–Knopp scaling diag(u) W diag(v), in the log domain of ``sinkhorn``; by default
    iterates to a marginal tolerance of 1e-5 (capped at ``max_iters``).
    """
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError("sinkhorn_project: expected a floating-point tensor")
    if W.numel() and not bool((W > 0).all()):
        raise ValueError("sinkhorn_project: W must be strictly positive (log W is taken)")
    return sinkhorn(W.log(), iters=iters, tol=tol, max_iters=max_iters, return_error=return_error,
                    nonconvergence=nonconvergence)


def mhc_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor):
    """(x_flat φ, Σ x_flat²): x_flat (..., n·C), φ (n·C, m) → (..., m), (...), in fp32 (fp64 for fp64
    x) in one pass over x; see ``mhc_reference.mhc_coeff_input``."""
    _check_coeff_input(x_flat, phi)
    if backend_for("mhc_coeff_input", x_flat, phi) == "triton":
        return triton_module("mhc_coeff_input").mhc_coeff_input(x_flat, phi)
    return mhc_reference.mhc_coeff_input(x_flat, phi)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Σ_i h_pre_i x_i over the n streams: x (..., n, C), h_pre (..., n) → (..., C)."""
    _check_pre(x, h_pre)
    if backend_for("mhc_pre", x, h_pre) == "triton":
        return triton_module("mhc_pre").mhc_pre(x, h_pre)
    return mhc_reference.mhc_pre(x, h_pre)


def mhc_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """out_i = Σ_j h_res[i, j] x_j + h_post_i f_out: x (..., n, C), f_out (..., C), h_res (..., n, n),
    h_post (..., n) → (..., n, C)."""
    _check_post_res(x, f_out, h_res, h_post)
    if backend_for("mhc_post_res", x, f_out, h_res, h_post) == "triton":
        return triton_module("mhc_post_res").mhc_post_res(x, f_out, h_res, h_post)
    return mhc_reference.mhc_post_res(x, f_out, h_res, h_post)


def mhc_layer(x: torch.Tensor, branch, coefficients, phi: torch.Tensor | None = None, weights=(),
              recompute: bool = False) -> torch.Tensor:
    """One hyper-connection layer: out = h_res x + h_post ⊗ branch(h_pre x), with (h_pre, h_post,
    h_res) = coefficients(x φ, Σx², *weights) (both None when ``phi`` is None) broadcastable to
    (..., n), (..., n), (..., n, n).

    Composes mhc_coeff_input, mhc_pre and mhc_post_res (Triton on CUDA, and what torch.compile
    traces; ``recompute`` checkpoints the coefficient map); in eager mode on the reference backend
    it runs the equivalent fused layer (``mhc_reference.mhc_layer``), which allocates a third of
    the stream-sized buffers."""
    _check_floating("mhc_layer", x=x)
    if x.ndim < 2:
        raise ValueError(f"mhc_layer: expected a stream tensor x (..., n, C), got {tuple(x.shape)}")
    if phi is not None:
        _check_coeff_input(x.flatten(-2), phi)
    if fused_layer(x):
        return mhc_reference.mhc_layer(x, branch, coefficients, phi, weights, recompute)
    raw = sumsq = None
    if phi is not None:
        raw, sumsq = mhc_coeff_input(x.flatten(-2), phi)
    if recompute and torch.is_grad_enabled():
        h_pre, h_post, h_res = checkpoint(coefficients, raw, sumsq, *weights, use_reentrant=False)
    else:
        h_pre, h_post, h_res = coefficients(raw, sumsq, *weights)
    lead, n = x.shape[:-2], x.size(-2)
    h_pre, h_post, h_res = h_pre.expand(*lead, n), h_post.expand(*lead, n), h_res.expand(*lead, n, n)
    u = mhc_pre(x, h_pre)
    return mhc_post_res(x, mhc_reference.branch_output(branch(u), u), h_res, h_post)
