"""Triton Sinkhorn–Knopp for many small matrices (n ≤ 16), forward and exact backward.

Each program owns BLOCK_B matrices held in registers as a (BLOCK_B, NP, NP) tile (NP = n padded
to a power of two). The iteration is kept in scaling form, P = exp(L + u_i + v_j): a row step sets
u = −logsumexp_j(L + v), a column step v = −logsumexp_i(L + u). This is the same alternating
normalisation as the reference (rows first, columns last) but cannot underflow a whole column,
whatever the spread of the logits. Each row of L is first shifted by its max (no iterate changes:
the first row step removes any row constant), so |L| is bounded by the row spread and u, v and
L + u + v stay finite; a matrix with a row spread above 2.1e37 (float32 max / 16, finite logits
such as ±3e38 only) is flagged NaN like a matrix with a non-finite logit (the reference runs those
in float64; no host sync here to choose that).

Backward (exact for the unrolled iteration): recompute the forward from the logits, writing the
column scalings v_t (NP floats per iteration and matrix, not the n×n iterates) to a scratch
buffer; then walk the half-steps in reverse with the log-gradient adjoint g ← g − P_k · Σ_axis g,
where P_k = exp(L + u_t + v_·) is rebuilt exactly from the logits, v_t, v_{t−1} and a recomputed
u_t (one extra row step per iteration instead of storing u).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 16
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Finite stand-in for −inf on padded rows / columns: exp() of it is 0 and sums of two stay finite.
_NEG = -1.0e30
# The largest float32: masks padding out of the row max / min, and BIG/16 is the largest row spread
# of the logits the kernel computes (a larger one flags the matrix NaN, as a non-finite logit does).
_BIG = 3.4028234663852886e38


@triton.jit
def _tile_offsets(pid, B, n, BLOCK_B: tl.constexpr, NP: tl.constexpr):
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    i = tl.arange(0, NP)
    j = tl.arange(0, NP)
    offs = b[:, None, None] * (n * n) + i[None, :, None] * n + j[None, None, :]
    mask = (b[:, None, None] < B) & (i[None, :, None] < n) & (j[None, None, :] < n)
    return b, i, j, offs, mask


@triton.jit
def _nan_if_nonfinite(L, mask):
    """Per matrix of the (BLOCK_B, NP, NP) tile: 0, or NaN when any logit is inf or NaN (L − L is 0
    exactly for finite L, NaN otherwise; padding is masked, as NEG loads as −inf in fp16). Added to
    the outputs it flags bad input without the host sync an exception would need; a sum, since a
    max may drop NaN on the GPU."""
    d = L - L
    return tl.sum(tl.sum(tl.where(mask & (d != 0.0), d, 0.0), axis=2), axis=1)


@triton.jit
def _shifted_logits(L, mask, NEG: tl.constexpr, BIG: tl.constexpr):
    """(L − max_j L_ij per row, flag): the row shift changes no iterate (the first row step removes
    it exactly) and bounds |L| by the row spread, so the scalings u, v and L + u + v stay finite.
    flag per matrix: 0, or NaN when a logit is not finite or a row spread exceeds BIG/16 (finite
    logits such as ±3e38, whose scalings would overflow fp32: they gave NaN matrices with err 0).
    Padding is reset to NEG (fp16 loads it as −inf)."""
    bad = _nan_if_nonfinite(L, mask)
    hi = tl.max(tl.where(mask, L, -BIG), axis=2)
    lo = tl.min(tl.where(mask, L, BIG), axis=2)
    row_ok = tl.max(mask.to(tl.int32), axis=2) > 0
    t = tl.where(row_ok, (hi - lo) * 16.0, 0.0)  # inf when the spread is above BIG/16
    over = t - t  # 0, or NaN there
    bad += tl.sum(tl.where(row_ok & (over != 0.0), over, 0.0), axis=1)
    return tl.where(mask, L - hi[:, :, None], NEG), bad


@triton.jit
def _row_scaling(L, v, row_ok, NEG: tl.constexpr):
    """u = −logsumexp_j(L_ij + v_j) per row; padded rows get NEG."""
    X = L + v[:, None, :]
    m = tl.max(X, axis=2)
    lse = m + tl.log(tl.sum(tl.exp(X - m[:, :, None]), axis=2))
    return tl.where(row_ok, -lse, NEG)


@triton.jit
def _col_scaling(L, u, col_ok, NEG: tl.constexpr):
    """v = −logsumexp_i(L_ij + u_i) per column; padded columns get NEG."""
    X = L + u[:, :, None]
    m = tl.max(X, axis=1)
    lse = m + tl.log(tl.sum(tl.exp(X - m[:, None, :]), axis=1))
    return tl.where(col_ok, -lse, NEG)


@triton.jit
def _sinkhorn_fwd_kernel(L_ptr, P_ptr, err_ptr, B, n, iters,
                         BLOCK_B: tl.constexpr, NP: tl.constexpr, NEG: tl.constexpr, BIG: tl.constexpr):
    pid = tl.program_id(0)
    b, i, j, offs, mask = _tile_offsets(pid, B, n, BLOCK_B, NP)
    L, bad = _shifted_logits(tl.load(L_ptr + offs, mask=mask, other=NEG).to(tl.float32), mask, NEG, BIG)
    row_ok = (i < n)[None, :]
    col_ok = (j < n)[None, :]
    v = tl.where(col_ok, tl.zeros((BLOCK_B, NP), dtype=tl.float32), NEG)
    u = tl.where(row_ok, tl.zeros((BLOCK_B, NP), dtype=tl.float32), NEG)
    for _ in range(iters):
        u = _row_scaling(L, v, row_ok, NEG)
        v = _col_scaling(L, u, col_ok, NEG)
    P = tl.exp(L + u[:, :, None] + v[:, None, :]) + bad[:, None, None]
    P = tl.where(mask, P, 0.0).to(P_ptr.dtype.element_ty)
    tl.store(P_ptr + offs, P, mask=mask)
    # Worst marginal error of this program's matrices as stored (bf16/fp16 rounding included); the
    # host takes the max over programs.
    P = P.to(tl.float32)
    b_ok = (b < B)[:, None]
    row_err = tl.where(b_ok & row_ok, tl.abs(tl.sum(P, axis=2) - 1.0), 0.0)
    col_err = tl.where(b_ok & col_ok, tl.abs(tl.sum(P, axis=1) - 1.0), 0.0)
    # max may drop NaN: a NaN anywhere in the stored P is added as a sum, so err is NaN with it
    nan_in_P = tl.sum(tl.sum(tl.sum(tl.where(mask, P - P, 0.0), axis=2), axis=1), axis=0)
    tl.store(err_ptr + pid, tl.maximum(tl.max(tl.max(row_err, axis=1), axis=0),
                                       tl.max(tl.max(col_err, axis=1), axis=0)) + tl.sum(bad, axis=0) + nan_in_P)


@triton.jit
def _sinkhorn_bwd_kernel(L_ptr, dP_ptr, dL_ptr, V_ptr, B, n, iters,
                         BLOCK_B: tl.constexpr, NP: tl.constexpr, NEG: tl.constexpr, BIG: tl.constexpr):
    pid = tl.program_id(0)
    b, i, j, offs, mask = _tile_offsets(pid, B, n, BLOCK_B, NP)
    L, bad = _shifted_logits(tl.load(L_ptr + offs, mask=mask, other=NEG).to(tl.float32), mask, NEG, BIG)
    row_ok = (i < n)[None, :]
    col_ok = (j < n)[None, :]
    # Scratch V[t, b, j] holds the column scaling before iteration t (V[0] = 0, V[t+1] after t).
    v_offs = b[:, None] * NP + j[None, :]
    v_mask = (b < B)[:, None] & col_ok
    v_stride = B * NP
    v = tl.where(col_ok, tl.zeros((BLOCK_B, NP), dtype=tl.float32), NEG)
    u = tl.where(row_ok, tl.zeros((BLOCK_B, NP), dtype=tl.float32), NEG)
    tl.store(V_ptr + v_offs, v, mask=v_mask)
    for t in range(iters):
        u = _row_scaling(L, v, row_ok, NEG)
        v = _col_scaling(L, u, col_ok, NEG)
        tl.store(V_ptr + (t + 1) * v_stride + v_offs, v, mask=v_mask)
    P = tl.exp(L + u[:, :, None] + v[:, None, :])
    dP = tl.load(dP_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, dP * P, 0.0)
    v_cur = v
    for s in range(iters):
        t = iters - 1 - s
        v_prev = tl.where(col_ok, tl.load(V_ptr + t * v_stride + v_offs, mask=v_mask, other=0.0), NEG)
        u = _row_scaling(L, v_prev, row_ok, NEG)
        # Column half-step of iteration t, then its row half-step.
        P_col = tl.exp(L + u[:, :, None] + v_cur[:, None, :])
        g = g - P_col * tl.sum(g, axis=1)[:, None, :]
        P_row = tl.exp(L + u[:, :, None] + v_prev[:, None, :])
        g = g - P_row * tl.sum(g, axis=2)[:, :, None]
        v_cur = v_prev
    g = g + bad[:, None, None]
    tl.store(dL_ptr + offs, g.to(dL_ptr.dtype.element_ty), mask=mask)


def _launch_config(n: int) -> tuple[int, int]:
    NP = max(2, triton.next_power_of_2(n))
    # Keep each program's tile at ≈ 1024 fp32 values: 64 matrices of 4×4, 4 of 16×16.
    return NP, max(1, 1024 // (NP * NP))


class _SinkhornTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters):
        shape, n = logits.shape, logits.size(-1)
        L = logits.detach().reshape(-1, n, n).contiguous()
        B = L.size(0)
        NP, BLOCK_B = _launch_config(n)
        grid = (triton.cdiv(B, BLOCK_B),)
        P = torch.empty_like(L)
        err = torch.zeros(max(grid[0], 1), device=L.device, dtype=torch.float32)
        if B > 0:
            _sinkhorn_fwd_kernel[grid](L, P, err, B, n, iters, BLOCK_B=BLOCK_B, NP=NP, NEG=_NEG, BIG=_BIG)
        ctx.save_for_backward(logits)
        ctx.iters = iters
        err = err.max()
        ctx.mark_non_differentiable(err)
        return P.reshape(shape), err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_P, grad_err):
        (logits,) = ctx.saved_tensors
        if grad_P is None:
            return None, None
        n, iters = logits.size(-1), ctx.iters
        L = logits.reshape(-1, n, n).contiguous()
        dP = grad_P.reshape(-1, n, n).contiguous()
        B = L.size(0)
        NP, BLOCK_B = _launch_config(n)
        dL = torch.empty_like(L)
        V = torch.empty((iters + 1, B, NP), device=L.device, dtype=torch.float32)
        if B > 0:
            grid = (triton.cdiv(B, BLOCK_B),)
            _sinkhorn_bwd_kernel[grid](L, dP, dL, V, B, n, iters, BLOCK_B=BLOCK_B, NP=NP, NEG=_NEG, BIG=_BIG)
        return dL.reshape(logits.shape), None


def supports(logits: torch.Tensor, tol: float | None = None) -> bool:
    """Whether this kernel computes ``sinkhorn(logits, tol=tol)``: fixed-iteration mode (no tol),
    square 1 ≤ n ≤ MAX_N, fp32/bf16/fp16 logits (it computes in fp32 registers)."""
    return (tol is None and logits.dtype in _DTYPES and logits.ndim >= 2
            and 1 <= logits.size(-1) == logits.size(-2) <= MAX_N)


def sinkhorn(logits: torch.Tensor, iters: int = 20, return_error: bool = False):
    """Sinkhorn–Knopp(exp(logits)) for (..., n, n), fixed ``iters``; exact backward.

    Same contract as the reference without tol mode: fp32 in registers, input dtype out,
    ``return_error`` gives (P, max |row or column sum − 1| of P as returned). Non-finite logits do
    not raise (that needs a host sync): their matrices come back all NaN, and so does err; so do
    matrices whose finite logits have a row spread above 2.1e37 (float32 cannot hold their
    scalings). err is NaN whenever P holds a NaN.
    Inputs are validated, and ``supports`` asked, by ``modula_mhc.kernels.sinkhorn``.
    """
    P, err = _SinkhornTriton.apply(logits, iters)
    return (P, err) if return_error else P
