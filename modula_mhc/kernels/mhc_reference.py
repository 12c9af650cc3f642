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

from . import cpu_mix

__all__ = ["mhc_coeff_input", "mhc_pre", "mhc_post_res"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coeff_forward(x_flat: torch.Tensor, phi: torch.Tensor):
    """(X, P, x φ, Σx²): X the (tokens, n·C) stream and P = φ in the accumulation dtype."""
    acc = _acc_dtype(x_flat.dtype)
    lead, K = x_flat.shape[:-1], x_flat.size(-1)
    X, P = x_flat.reshape(-1, K).to(acc), phi.to(acc)  # X is a view when x is contiguous and already acc
    raw = (X @ P).reshape(*lead, P.size(1))
    sumsq = torch.linalg.vector_norm(X, dim=-1).square().reshape(lead)  # one read of x, no temporary
    return X, P, raw, sumsq


def _coeff_backward(X: torch.Tensor, P: torch.Tensor, d_raw: torch.Tensor, d_sumsq: torch.Tensor, dx=None):
    """(dx, dφᵀ) of (x φ, Σx²): dx = dH̃ φᵀ + 2·dss·x, added in place into ``dx`` (tokens, n·C)
    when given; dφᵀ = dH̃ᵀ x (the faster operand order on CPU)."""
    d_raw = d_raw.reshape(-1, P.size(1)).to(X.dtype)
    scale = 2.0 * d_sumsq.reshape(-1, 1).to(X.dtype)
    Pt = P.mT.contiguous()  # a row-major φᵀ: the skinny product is ~1.4x faster on CPU than through the view
    if dx is None:
        dx = (X * scale).addmm_(d_raw, Pt)
    elif dx.dtype == X.dtype:
        dx.addmm_(d_raw, Pt).addcmul_(X, scale)
    else:  # bf16/fp16 activations: the coefficient path's gradient formed in fp32, added once
        dx.add_((X * scale).addmm_(d_raw, Pt))
    return dx, d_raw.mT @ X


class _CoeffInput(torch.autograd.Function):
    """(x φ, Σx²) and its adjoint dx = dH̃ φᵀ + 2·dss·x, dφ = xᵀ dH̃."""

    @staticmethod
    def forward(ctx, x_flat, phi):
        X, P, raw, sumsq = _coeff_forward(x_flat, phi)
        ctx.save_for_backward(X, P)
        ctx.x_meta, ctx.phi_dtype = (x_flat.shape, x_flat.dtype), phi.dtype
        return raw, sumsq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_raw, d_sumsq):
        X, P = ctx.saved_tensors
        dx, dphi_t = _coeff_backward(X, P, d_raw, d_sumsq)
        shape, dtype = ctx.x_meta
        return dx.reshape(shape).to(dtype), dphi_t.mT.to(ctx.phi_dtype)


class _Pre(torch.autograd.Function):
    """u = Σ_i h_i x_i as a batched (1 × n)(n × C) product; adjoint dx_i = h_i du, dh_i = ⟨x_i, du⟩."""

    @staticmethod
    def forward(ctx, x, h_pre):
        h = h_pre.to(x.dtype).contiguous()  # a strided h sends the batched product down a slow path
        ctx.save_for_backward(x, h)
        ctx.h_dtype = h_pre.dtype
        if cpu_mix.usable(x):
            x = x.contiguous()
            return cpu_mix.pre_res(x, cpu_mix.tokens_major(h, x.shape[:-2], x.size(-2)), None)[0]
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
        if cpu_mix.usable(x, f_out):  # the same C passes as the fused layer: the same values, bit for bit
            lead, n = x.shape[:-2], x.size(-2)
            out = cpu_mix.pre_res(x.contiguous(), None, cpu_mix.tokens_major(H, lead, n, n))[1]
            cpu_mix.add_post_(out, cpu_mix.tokens_major(q, lead, n), f_out.contiguous())
        else:
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


# --------------------------------------------------------------------------------------------
# The whole layer around a branch: two autograd nodes instead of one per kernel
# --------------------------------------------------------------------------------------------


def _coefficient_graph(coefficients, raw, sumsq, weights, needs):
    """(leaves, (h_pre, h_post, h_res)): the small coefficient map run on detached leaves, so the
    backward can differentiate it on its own (``needs``: which weights want a gradient)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (raw, sumsq)]
    leaves += [w.detach().requires_grad_(bool(need)) for w, need in zip(weights, needs)]
    with torch.enable_grad():
        return leaves, coefficients(*leaves)


def _leaf_grads(leaves, h, grad_h):
    """Gradients of the coefficient map's leaves (None for those that want none). Only outputs that
    depend on a leaf enter ``autograd.grad``, and it is skipped when nothing does: constant
    coefficients, or frozen weights without φ, are valid maps with nothing to differentiate."""
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    pairs = [(t, g) for t, g in zip(h, grad_h) if t.requires_grad]
    if not wanted or not pairs:
        return [None] * len(leaves)
    outs, grads = zip(*pairs)
    # zeros (not None) for a leaf the map does not use: x φ and Σx² are consumed together below
    found = iter(torch.autograd.grad(outs, wanted, grads, retain_graph=True, materialize_grads=True))
    return [next(found) if t is not None and t.requires_grad else None for t in leaves]


class _PreRes(torch.autograd.Function):
    """u = h_pre x and r = h_res x with (h_pre, h_post, h_res) = coefficients(x φ, Σx², *weights)
    computed inside. The backward writes dx once: h_pre ⊗ du, then += h_resᵀ dr, += dH̃ φᵀ and
    += 2·dss·x in place, where autograd through separate nodes allocates and adds three buffers."""

    @staticmethod
    def forward(ctx, x, phi, coefficients, recompute, *weights):
        X = P = raw = sumsq = None
        if phi is not None:
            X, P, raw, sumsq = _coeff_forward(x.flatten(-2), phi)
        needs = ctx.needs_input_grad[4:]
        leaves, h = _coefficient_graph(coefficients, raw, sumsq, weights, needs)
        h_pre, h_post, h_res = (t.detach() for t in h)
        p, H = h_pre.to(x.dtype).contiguous(), h_res.to(x.dtype)
        ctx.fused = cpu_mix.usable(x)
        if ctx.fused:  # one C pass over the stream for both products (kernels/cpu_mix.py)
            lead, n = x.shape[:-2], x.size(-2)
            x, p, H = x.contiguous(), cpu_mix.tokens_major(p, lead, n), cpu_mix.tokens_major(H, lead, n, n)
            u, r = cpu_mix.pre_res(x, p, H)
        else:
            u = (p.unsqueeze(-2) @ x).squeeze(-2)
            r = H @ x
        ctx.save_for_backward(x, X, P, p, H, raw, sumsq, *weights)
        ctx.graph = None if recompute else (leaves, h)  # recompute: rebuild the small map in backward
        ctx.coefficients, ctx.needs = coefficients, needs
        ctx.phi_dtype = None if phi is None else phi.dtype
        return u, r, h_post

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, du, dr, dq):
        x, X, P, p, H, raw, sumsq, *weights = ctx.saved_tensors
        leaves, h = ctx.graph or _coefficient_graph(ctx.coefficients, raw, sumsq, weights, ctx.needs)
        lead, (n, C) = x.shape[:-2], x.shape[-2:]
        if ctx.fused:
            dx, dp, dH = cpu_mix.pre_res_backward(x, p, H, du.contiguous(), dr.contiguous())
            grad_h = (dp.view(*lead, n), dq, dH.view(*lead, n, n))
        else:
            dx = p.unsqueeze(-1) * du.unsqueeze(-2)
            Ht = H.mT.expand(*lead, n, n).reshape(-1, n, n).contiguous()
            dx.view(-1, n, C).baddbmm_(Ht, dr.reshape(-1, n, C))
            grad_h = ((du.unsqueeze(-2) @ x.mT).squeeze(-2), dq, dr @ x.mT)  # dh_pre, dh_post, dH per token
        grad_h = [g.to(t.dtype).sum_to_size(t.shape) for g, t in zip(grad_h, h)]  # static coefficients: summed
        d_raw, d_sumsq, *d_weights = _leaf_grads(leaves, h, grad_h)
        dphi = None
        if d_raw is not None:  # a map that ignores x φ and Σx² leaves φ without gradient
            dphi = _coeff_backward(X, P, d_raw, d_sumsq, dx.view(-1, X.size(1)))[1].mT.to(ctx.phi_dtype)
        return (dx, dphi, None, None, *(None if g is None else g.to(w.dtype) for g, w in zip(d_weights, weights)))


class _AddPost(torch.autograd.Function):
    """out = r + h_post ⊗ f, written into r (the residual mix is not needed again); adjoint
    dr = dout, df = h_postᵀ dout, dh_post = dout f."""

    @staticmethod
    def forward(ctx, r, f_out, h_post):
        q = h_post.to(r.dtype).contiguous()
        ctx.fused = r.is_contiguous() and cpu_mix.usable(r, f_out)
        if ctx.fused:  # C passes here and for the backward's two reductions (kernels/cpu_mix.py)
            q, f_out = cpu_mix.tokens_major(q, r.shape[:-2], r.size(-2)), f_out.contiguous()
            cpu_mix.add_post_(r, q, f_out)
        else:
            r.addcmul_(q.unsqueeze(-1), f_out.unsqueeze(-2))
        ctx.mark_dirty(r)
        ctx.save_for_backward(f_out, q)
        ctx.q_dtype = h_post.dtype
        return r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        f, q = ctx.saved_tensors
        if ctx.fused:
            df, dq = cpu_mix.add_post_backward(d_out.contiguous(), q, f)
            return d_out, df, dq.view(d_out.shape[:-1]).to(ctx.q_dtype)
        # under autocast f (the branch's output) may be bf16 while the stream is float32
        df = (q.unsqueeze(-2) @ d_out).squeeze(-2).to(f.dtype)
        dq = (f.to(d_out.dtype).unsqueeze(-2) @ d_out.mT).squeeze(-2).to(ctx.q_dtype)
        return d_out, df, dq


def branch_output(f_out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F(u) at u's full shape (..., C). A branch may return a tensor that broadcasts against u (a
    bias, a pooled (B, 1, C)), as in a plain residual u + F(u); the mixing passes read one row per
    token, so it is expanded here, outside their autograd nodes: autograd then sums the gradient back
    over the broadcast dims. A view, no copy; shapes only."""
    if f_out.shape == u.shape:
        return f_out
    try:
        ok = torch.broadcast_shapes(f_out.shape, u.shape) == u.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mhc_layer: the branch maps u {tuple(u.shape)} to {tuple(f_out.shape)}, which does "
                         "not broadcast to u's shape (a hyper-connection branch maps C to C)")
    return f_out.expand(u.shape)


def mhc_layer(x: torch.Tensor, branch, coefficients, phi: torch.Tensor | None = None, weights=(),
              recompute: bool = False) -> torch.Tensor:
    """out = h_res x + h_post ⊗ branch(h_pre x) with (h_pre, h_post, h_res) = coefficients(x φ, Σx²,
    *weights) (x φ and Σx² are None when ``phi`` is None), as two autograd nodes around the branch.

    Same values as mhc_coeff_input → coefficients → mhc_pre → branch → mhc_post_res; the gradient
    of x is formed in one buffer and the output overwrites the residual mix, so a layer allocates
    two stream-sized tensors (output, gradient) instead of four. ``recompute`` rebuilds the small
    coefficient graph in the backward instead of keeping it."""
    u, r, h_post = _PreRes.apply(x, phi, coefficients, recompute, *weights)
    return _AddPost.apply(r, branch_output(branch(u), u), h_post)
