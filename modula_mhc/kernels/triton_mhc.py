"""Triton kernels for mHC stream mixing, forward and backward, each wrapped in an autograd.Function.

Tokens are flattened to rows; x has shape (M, n, C). Orientation: H_res[m, i, j] weights input
stream j in output stream i. All arithmetic in fp32; outputs in the activation dtype.

(a) coefficients: (x φ, Σ x²) over the flattened n·C in one pass over x.
(b) pre-mix: Σ_i h_i x_i.
(c) post + residual: out_i = Σ_j H[i, j] x_j + h_post_i f, reading the (n+1)·C inputs once.

Inputs are validated, and ``supports`` asked, by the public functions of ``modula_mhc.kernels``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tuning import Tiled

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these kernels compute the mixing of these inputs: fp32/bf16/fp16 (fp32 arithmetic);
    float64 stays with the reference."""
    return all(t.dtype in _DTYPES for t in tensors)


def _np2(n: int, floor: int = 2) -> int:
    return max(floor, triton.next_power_of_2(n))


# --------------------------------------------------------------------------------------------
# (a) x φ and Σ x²
# --------------------------------------------------------------------------------------------


@triton.jit
def _coeff_fwd_kernel(X_ptr, Phi_ptr, H_ptr, SS_ptr, M, K, m,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, MP)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, MP), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        x = tl.load(X_ptr + rows[:, None] * K + kk[None, :],
                    mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)
        phi = tl.load(Phi_ptr + kk[:, None] * m + cols[None, :],
                      mask=(kk[:, None] < K) & (cols[None, :] < m), other=0.0).to(tl.float32)
        acc += tl.dot(x, phi, input_precision="ieee")
        ss += tl.sum(x * x, axis=1)
    tl.store(H_ptr + rows[:, None] * m + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < m))
    tl.store(SS_ptr + rows, ss, mask=rows < M)


@triton.jit
def _coeff_bwd_kernel(X_ptr, Phi_ptr, dH_ptr, dSS_ptr, dX_ptr, M, K, m,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, MP)
    dh = tl.load(dH_ptr + rows[:, None] * m + cols[None, :],
                 mask=(rows[:, None] < M) & (cols[None, :] < m), other=0.0).to(tl.float32)
    phi_t = tl.load(Phi_ptr + kk[None, :] * m + cols[:, None],
                    mask=(kk[None, :] < K) & (cols[:, None] < m), other=0.0).to(tl.float32)
    xmask = (rows[:, None] < M) & (kk[None, :] < K)
    x = tl.load(X_ptr + rows[:, None] * K + kk[None, :], mask=xmask, other=0.0).to(tl.float32)
    dss = tl.load(dSS_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)
    dx = tl.dot(dh, phi_t, input_precision="ieee") + 2.0 * x * dss[:, None]
    tl.store(dX_ptr + rows[:, None] * K + kk[None, :], dx.to(dX_ptr.dtype.element_ty), mask=xmask)


class _CoeffInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_flat, phi):
        K, m = phi.shape
        lead = x_flat.shape[:-1]
        X = x_flat.reshape(-1, K).contiguous()
        P = phi.contiguous()
        M = X.size(0)
        H = torch.empty((M, m), device=X.device, dtype=torch.float32)
        SS = torch.empty((M,), device=X.device, dtype=torch.float32)
        if M:
            _COEFF_FWD.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), X, P, H, SS, M, K, m, MP=_np2(m, 16))
        ctx.save_for_backward(X, P)
        ctx.lead = lead
        return H.reshape(*lead, m), SS.reshape(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dH, dSS):
        X, P = ctx.saved_tensors
        M, K = X.shape
        m = P.size(1)
        dH = torch.zeros((M, m), device=X.device) if dH is None else dH.reshape(M, m).float().contiguous()
        dSS = torch.zeros((M,), device=X.device) if dSS is None else dSS.reshape(M).float().contiguous()
        dX = dphi = None
        if ctx.needs_input_grad[0]:
            dX = torch.empty_like(X)
            if M:
                _COEFF_BWD.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])),
                                  X, P, dH, dSS, dX, M, K, m, MP=_np2(m, 16))
            dX = dX.reshape(*ctx.lead, K)
        if ctx.needs_input_grad[1]:  # a reduction over all tokens, without an fp32 copy of x (an H100
            # profile at 8192 tokens × 8192 had the copy at ~0.2 ms of the layer's 2.6)
            dphi = torch.empty((K, m), device=X.device, dtype=torch.float32)
            if K:
                _COEFF_DPHI.launch(lambda meta: (triton.cdiv(K, meta["BLOCK_K"]),), X, dH, dphi, M, K, m, MP=_np2(m, 16))
            dphi = dphi.to(P.dtype)
        return dX, dphi


def mhc_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor):
    """(x_flat φ, Σ x_flat²) in fp32, one pass over x; see ``mhc_reference.mhc_coeff_input``."""
    return _CoeffInput.apply(x_flat, phi)


@triton.jit
def _coeff_dphi_kernel(X_ptr, dH_ptr, dPhi_ptr, M, K, m,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr):
    # dφ[k, :] = Σ_rows x[row, k] dH[row, :]: one program per block of k, reading x in its own dtype
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, MP)
    acc = tl.zeros((BLOCK_K, MP), dtype=tl.float32)
    for r0 in range(0, M, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        x = tl.load(X_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        dh = tl.load(dH_ptr + rows[:, None] * m + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < m),
                     other=0.0)
        acc += tl.dot(tl.trans(x), dh, input_precision="ieee")
    tl.store(dPhi_ptr + kk[:, None] * m + cols[None, :], acc, mask=(kk[:, None] < K) & (cols[None, :] < m))


# --------------------------------------------------------------------------------------------
# (b) pre-mix
# --------------------------------------------------------------------------------------------


@triton.jit
def _pre_fwd_kernel(X_ptr, Hp_ptr, O_ptr, M, n, C,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    st = tl.arange(0, NP)
    h = tl.load(Hp_ptr + rows[:, None] * n + st[None, :],
                mask=(rows[:, None] < M) & (st[None, :] < n), other=0.0).to(tl.float32)
    x = tl.load(X_ptr + rows[:, None, None] * (n * C) + st[None, :, None] * C + cs[None, None, :],
                mask=(rows[:, None, None] < M) & (st[None, :, None] < n) & (cs[None, None, :] < C),
                other=0.0).to(tl.float32)
    out = tl.sum(h[:, :, None] * x, axis=1)
    tl.store(O_ptr + rows[:, None] * C + cs[None, :], out.to(O_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cs[None, :] < C))


@triton.jit
def _pre_bwd_kernel(X_ptr, Hp_ptr, dO_ptr, dX_ptr, dHp_ptr, M, n, C,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    st = tl.arange(0, NP)
    hmask = (rows[:, None] < M) & (st[None, :] < n)
    h = tl.load(Hp_ptr + rows[:, None] * n + st[None, :], mask=hmask, other=0.0).to(tl.float32)
    dh = tl.zeros((BLOCK_M, NP), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        dmask = (rows[:, None] < M) & (cs[None, :] < C)
        do = tl.load(dO_ptr + rows[:, None] * C + cs[None, :], mask=dmask, other=0.0).to(tl.float32)
        xoffs = rows[:, None, None] * (n * C) + st[None, :, None] * C + cs[None, None, :]
        xmask = (rows[:, None, None] < M) & (st[None, :, None] < n) & (cs[None, None, :] < C)
        x = tl.load(X_ptr + xoffs, mask=xmask, other=0.0).to(tl.float32)
        tl.store(dX_ptr + xoffs, (h[:, :, None] * do[:, None, :]).to(dX_ptr.dtype.element_ty), mask=xmask)
        dh += tl.sum(x * do[:, None, :], axis=2)
    tl.store(dHp_ptr + rows[:, None] * n + st[None, :], dh.to(dHp_ptr.dtype.element_ty), mask=hmask)


class _Pre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        lead, n, C = x.shape[:-2], x.size(-2), x.size(-1)
        X = x.reshape(-1, n, C).contiguous()
        Hp = h_pre.reshape(-1, n).contiguous()
        M = X.size(0)
        out = torch.empty((M, C), device=x.device, dtype=x.dtype)
        if M and C:
            _PRE_FWD.launch(_rows_by_columns(M, C), X, Hp, out, M, n, C, NP=_np2(n))
        ctx.save_for_backward(X, Hp)
        ctx.shapes = (x.shape, h_pre.shape)
        return out.reshape(*lead, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        X, Hp = ctx.saved_tensors
        M, n, C = X.shape
        dO = d_out.reshape(M, C).contiguous()
        dX = torch.empty_like(X)
        dHp = torch.empty_like(Hp)
        if M:
            _PRE_BWD.launch(_rows(M), X, Hp, dO, dX, dHp, M, n, C, NP=_np2(n))
        return dX.reshape(ctx.shapes[0]), dHp.reshape(ctx.shapes[1])


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Σ_i h_pre_i x_i: (..., n, C), (..., n) → (..., C); see ``mhc_reference.mhc_pre``."""
    return _Pre.apply(x, h_pre)


# --------------------------------------------------------------------------------------------
# (c) post + residual
# --------------------------------------------------------------------------------------------


@triton.jit
def _post_res_fwd_kernel(X_ptr, F_ptr, Hr_ptr, Hq_ptr, O_ptr, M, n, C,
                         N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    st = tl.arange(0, NP)
    rc_mask = (rows[:, None] < M) & (cs[None, :] < C)
    h_mask = (rows[:, None] < M) & (st[None, :] < n)
    f = tl.load(F_ptr + rows[:, None] * C + cs[None, :], mask=rc_mask, other=0.0).to(tl.float32)
    hq = tl.load(Hq_ptr + rows[:, None] * n + st[None, :], mask=h_mask, other=0.0).to(tl.float32)
    out = hq[:, :, None] * f[:, None, :]
    for j in tl.static_range(N):
        xj = tl.load(X_ptr + rows[:, None] * (n * C) + j * C + cs[None, :], mask=rc_mask, other=0.0).to(tl.float32)
        h_col = tl.load(Hr_ptr + rows[:, None] * (n * n) + st[None, :] * n + j, mask=h_mask, other=0.0).to(tl.float32)
        out += h_col[:, :, None] * xj[:, None, :]  # out[m, i, c] += H[m, i, j] x_j[m, c]
    ooffs = rows[:, None, None] * (n * C) + st[None, :, None] * C + cs[None, None, :]
    omask = (rows[:, None, None] < M) & (st[None, :, None] < n) & (cs[None, None, :] < C)
    tl.store(O_ptr + ooffs, out.to(O_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _post_res_bwd_kernel(X_ptr, F_ptr, Hr_ptr, Hq_ptr, dO_ptr, dX_ptr, dF_ptr, dHr_ptr, dHq_ptr, M, n, C,
                         N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    st = tl.arange(0, NP)
    h_mask = (rows[:, None] < M) & (st[None, :] < n)
    hq = tl.load(Hq_ptr + rows[:, None] * n + st[None, :], mask=h_mask, other=0.0).to(tl.float32)
    d_hq = tl.zeros((BLOCK_M, NP), dtype=tl.float32)
    d_hr = tl.zeros((BLOCK_M, NP, NP), dtype=tl.float32)  # [m, i, j]
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        rc_mask = (rows[:, None] < M) & (cs[None, :] < C)
        doffs = rows[:, None, None] * (n * C) + st[None, :, None] * C + cs[None, None, :]
        dmask = (rows[:, None, None] < M) & (st[None, :, None] < n) & (cs[None, None, :] < C)
        do = tl.load(dO_ptr + doffs, mask=dmask, other=0.0).to(tl.float32)  # [m, i, c]
        f = tl.load(F_ptr + rows[:, None] * C + cs[None, :], mask=rc_mask, other=0.0).to(tl.float32)
        d_hq += tl.sum(do * f[:, None, :], axis=2)
        df = tl.sum(hq[:, :, None] * do, axis=1)
        tl.store(dF_ptr + rows[:, None] * C + cs[None, :], df.to(dF_ptr.dtype.element_ty), mask=rc_mask)
        for j in tl.static_range(N):
            xj = tl.load(X_ptr + rows[:, None] * (n * C) + j * C + cs[None, :], mask=rc_mask, other=0.0).to(tl.float32)
            h_col = tl.load(Hr_ptr + rows[:, None] * (n * n) + st[None, :] * n + j, mask=h_mask, other=0.0).to(tl.float32)
            dxj = tl.sum(h_col[:, :, None] * do, axis=1)  # Σ_i H[m, i, j] dout_i
            tl.store(dX_ptr + rows[:, None] * (n * C) + j * C + cs[None, :], dxj.to(dX_ptr.dtype.element_ty), mask=rc_mask)
            g = tl.sum(do * xj[:, None, :], axis=2)  # dH[m, i, j] = Σ_c dout_i x_j
            d_hr += tl.where(st[None, None, :] == j, g[:, :, None], 0.0)
    tl.store(dHq_ptr + rows[:, None] * n + st[None, :], d_hq.to(dHq_ptr.dtype.element_ty), mask=h_mask)
    hr_offs = rows[:, None, None] * (n * n) + st[None, :, None] * n + st[None, None, :]
    hr_mask = (rows[:, None, None] < M) & (st[None, :, None] < n) & (st[None, None, :] < n)
    tl.store(dHr_ptr + hr_offs, d_hr.to(dHr_ptr.dtype.element_ty), mask=hr_mask)


class _PostRes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f_out, h_res, h_post):
        n, C = x.size(-2), x.size(-1)
        X = x.reshape(-1, n, C).contiguous()
        F = f_out.reshape(-1, C).contiguous()
        Hr = h_res.reshape(-1, n, n).contiguous()
        Hq = h_post.reshape(-1, n).contiguous()
        M = X.size(0)
        out = torch.empty_like(X)
        if M and C:
            _POST_RES_FWD.launch(_rows_by_columns(M, C), X, F, Hr, Hq, out, M, n, C, N=n, NP=_np2(n))
        ctx.save_for_backward(X, F, Hr, Hq)
        ctx.shapes = (x.shape, f_out.shape, h_res.shape, h_post.shape)
        return out.reshape(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        X, F, Hr, Hq = ctx.saved_tensors
        M, n, C = X.shape
        dO = d_out.reshape(M, n, C).contiguous()
        dX, dF = torch.empty_like(X), torch.empty_like(F)
        dHr, dHq = torch.empty_like(Hr), torch.empty_like(Hq)
        if M:
            _POST_RES_BWD.launch(_rows(M), X, F, Hr, Hq, dO, dX, dF, dHr, dHq, M, n, C, N=n, NP=_np2(n))
        return tuple(g.reshape(s) for g, s in zip((dX, dF, dHr, dHq), ctx.shapes))


def mhc_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """out_i = Σ_j h_res[i, j] x_j + h_post_i f_out; see ``mhc_reference.mhc_post_res``."""
    return _PostRes.apply(x, f_out, h_res, h_post)


# --------------------------------------------------------------------------------------------
# tiles: the shipped ones (16 rows × 64 columns, 4 warps) first, then candidates tuned per shape on
# a GPU (see triton_tuning). On an H100 at 8192 tokens × 4 streams × 2048 the shipped tiles left the
# coefficient backward at 0.66 ms and its forward at 0.30 ms, for passes that move ~0.1 ms of memory
# --------------------------------------------------------------------------------------------


def _rows(M):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def _rows_by_columns(M, C):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))


_MK, _MC = ("BLOCK_M", "BLOCK_K"), ("BLOCK_M", "BLOCK_C")
_K_LOOP = [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 256, 4, 3), (64, 256, 8, 3), (128, 64, 8, 3)]
_K_TILE = [(32, 128, 4, 1), (64, 128, 4, 1), (64, 256, 8, 1), (128, 128, 8, 1), (32, 256, 4, 1)]
_C_TILE = [(16, 128, 4, 1), (32, 128, 4, 1), (16, 256, 4, 1), (32, 256, 8, 1), (64, 128, 8, 1)]
_C_LOOP = [(16, 128, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (16, 256, 8, 2), (64, 64, 8, 2)]


_SHIPPED = (16, 64)
_COEFF_FWD = Tiled(_coeff_fwd_kernel, _MK, _SHIPPED, _K_LOOP, ["M", "K", "m"])
_COEFF_BWD = Tiled(_coeff_bwd_kernel, _MK, _SHIPPED, _K_TILE, ["M", "K", "m"])
_COEFF_DPHI = Tiled(_coeff_dphi_kernel, _MK, (64, 32),
                    [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (256, 32, 8, 3), (32, 16, 4, 3)], ["M", "K", "m"])
_PRE_FWD = Tiled(_pre_fwd_kernel, _MC, _SHIPPED, _C_TILE, ["M", "n", "C"])
_PRE_BWD = Tiled(_pre_bwd_kernel, _MC, _SHIPPED, _C_LOOP, ["M", "n", "C"])
_POST_RES_FWD = Tiled(_post_res_fwd_kernel, _MC, _SHIPPED, _C_TILE, ["M", "n", "C"])
_POST_RES_BWD = Tiled(_post_res_bwd_kernel, _MC, _SHIPPED, _C_LOOP, ["M", "n", "C"])
