"""PyTorch reference of the mHC stream-mixing kernels, each an autograd.Function whose backward
touches every large tensor as few times as the maths allows.

Convention: ``h_res[..., i, j]`` weights input stream j in output stream i, out_i = Σ_j h_res[i, j] x_j.
Stream tensors are (..., n, C); per-token coefficients (..., n) and (..., n, n). Inputs are checked
once, at ``modula_mhc.kernels``; these functions assume matching shapes.

- ``mhc_coeff_input``: (x φ, Σ x²) over the flattened n·C stream, in fp32 (fp64 for fp64 x).
- ``mhc_pre``: the pre-mix u = Σ_i h_pre_i x_i.
- ``mhc_post_res``: the post + residual mix out_i = Σ_j h_res[i, j] x_j + h_post_i f.

Why hand-written backwards: autograd through these products allocates a stream-sized temporary
for every broadcast term and transposes the per-token (n × n) factors into strided views; here
every gradient is one batched product (reductions over C write only (..., n)) or one elementwise
pass, and only the gradients themselves are stream-sized: fresh large buffers are what costs most
on CPU.
"""

from __future__ import annotations

import torch

__all__ = ["mhc_coeff_input", "mhc_pre", "mhc_post_res"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _CoeffInput(torch.autograd.Function):
    """(x φ, Σx²) and its adjoint dx = dH φᵀ + 2·dss·x, dφ = xᵀ dH."""

    @staticmethod
    def forward(ctx, x_flat, phi):
        acc = _acc_dtype(x_flat.dtype)
        lead, K = x_flat.shape[:-1], x_flat.size(-1)
        X = x_flat.reshape(-1, K).to(acc)  # a view when x is contiguous and already acc
        P = phi.to(acc)
        raw = X @ P
        sumsq = torch.linalg.vector_norm(X, dim=-1).square()  # one read of x, no temporary
        ctx.save_for_backward(X, P)
        ctx.x_meta, ctx.phi_dtype = (x_flat.shape, x_flat.dtype), phi.dtype
        return raw.reshape(*lead, P.size(1)), sumsq.reshape(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_raw, d_sumsq):
        X, P = ctx.saved_tensors
        d_raw = d_raw.reshape(-1, P.size(1)).to(X.dtype)
        dx = dphi = None
        if ctx.needs_input_grad[0]:
            dx = (X * (2.0 * d_sumsq.reshape(-1, 1).to(X.dtype))).addmm_(d_raw, P.mT)  # in place: no second buffer
            shape, dtype = ctx.x_meta
            dx = dx.reshape(shape).to(dtype)
        if ctx.needs_input_grad[1]:
            dphi = (X.mT @ d_raw).to(ctx.phi_dtype)
        return dx, dphi


class _Pre(torch.autograd.Function):
    """u = Σ_i h_i x_i as a batched (1 × n)(n × C) product; adjoint dx_i = h_i du, dh_i = ⟨x_i, du⟩."""

    @staticmethod
    def forward(ctx, x, h_pre):
        h = h_pre.to(x.dtype).contiguous()  # a strided h sends the batched product down a slow path
        ctx.save_for_backward(x, h)
        ctx.h_dtype = h_pre.dtype
        return (h.unsqueeze(-2) @ x).squeeze(-2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, du):
        x, h = ctx.saved_tensors
        dx = h.unsqueeze(-1) * du.unsqueeze(-2) if ctx.needs_input_grad[0] else None
        dh = (du.unsqueeze(-2) @ x.mT).squeeze(-2).to(ctx.h_dtype) if ctx.needs_input_grad[1] else None
        return dx, dh


class _PostRes(torch.autograd.Function):
    """out = H x + h_post ⊗ f; adjoint dx = Hᵀ dout, df = h_postᵀ dout, dH = dout xᵀ, dh_post = dout f."""

    @staticmethod
    def forward(ctx, x, f_out, h_res, h_post):
        dt = x.dtype
        H, q = h_res.to(dt), h_post.to(dt).contiguous()
        out = (H @ x).addcmul_(q.unsqueeze(-1), f_out.unsqueeze(-2))
        ctx.save_for_backward(x, f_out, H, q)
        ctx.h_dtypes = (h_res.dtype, h_post.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, f, H, q = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = H.mT.contiguous() @ d_out if need[0] else None
        df = (q.unsqueeze(-2) @ d_out).squeeze(-2) if need[1] else None
        dH = (d_out @ x.mT).to(ctx.h_dtypes[0]) if need[2] else None
        dq = (f.unsqueeze(-2) @ d_out.mT).squeeze(-2).to(ctx.h_dtypes[1]) if need[3] else None
        return dx, df, dH, dq


def mhc_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_flat φ, Σ x_flat²): x_flat (..., n·C), φ (n·C, m) → (..., m), (...), in fp32 (fp64 for fp64).

    The sum of squares feeds the RMS normalisation: x̃ φ = x φ / rms(x), so normalising after the
    product is the same map and reads x once for both."""
    return _CoeffInput.apply(x_flat, phi)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Pre-mix u = Σ_i h_pre_i x_i: x (..., n, C), h_pre (..., n) → (..., C), in x's dtype."""
    return _Pre.apply(x, h_pre)


def mhc_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """Post + residual mix out_i = Σ_j h_res[i, j] x_j + h_post_i f_out: x (..., n, C), f_out (..., C),
    h_res (..., n, n), h_post (..., n) → (..., n, C), in x's dtype."""
    return _PostRes.apply(x, f_out, h_res, h_post)
