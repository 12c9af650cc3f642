"""Triton symmetric product for Polar Express: S = α X Xᵀ + β C computing one triangle only.

X Xᵀ is symmetric, so only tiles on or below the diagonal are computed (about half the FLOPs of
a general matmul) and each off-diagonal tile is also written, transposed, to its mirror. Since
S is symmetric, S² = S Sᵀ is the same kind of product, so both products of one Polar Express step
(S = X Xᵀ, then B = b S + c S²) use this kernel; the third, a Y + B Y, is a general matmul.
Accumulation is fp32 whatever the input dtype (bf16 in, bf16 out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import msign_coeffs, msign_normalise, msign_tighten
from .triton_tuning import Tiled, interpreting

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(X: torch.Tensor) -> bool:
    """Whether this kernel computes ``msign(X)``: fp32/bf16/fp16 (fp32 accumulation); float64 has
    no reason to use it and stays with the reference."""
    return X.dtype in _DTYPES


#: the least work, batch·M²·K for M ≤ K, at which Triton's msign beats the reference on a GPU.
#: Measured on an H100 (benchmarks/results/msign_shapes_gpu.json, 8 steps, autotuned): bf16 stacks
#: (48, 768, 768), (24, 768, 3072) and one 4096² matrix ran at 1.18, 1.10 and 1.24× the reference;
#: 128-sized stacks and one 1024² matrix at 0.48–0.54×, and every float32 input at 0.47–0.90×
PREFERRED_WORK = 1e10


def preferred(X: torch.Tensor) -> bool:
    """Whether this kernel is the faster msign for X on a GPU (``PREFERRED_WORK``): half precision
    and enough work per call; the dispatcher runs the reference otherwise unless Triton is forced."""
    if X.dtype not in (torch.bfloat16, torch.float16) or X.ndim < 2:
        return False
    M, K = sorted(X.shape[-2:])
    return X.numel() // max(M * K, 1) * M * M * K >= PREFERRED_WORK


@triton.jit
def _syrk_kernel(X_ptr, C_ptr, S_ptr, M, K, alpha, beta,
                 stride_xb, stride_xm, stride_xk, stride_cb, stride_sb,
                 HAS_C: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    bat = tl.program_id(2)
    if tj <= ti:  # lower triangle of tiles only; the mirror is written below
        rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        x_base = X_ptr + bat * stride_xb
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(x_base + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
            bt = tl.load(x_base + cols[None, :] * stride_xm + kk[:, None] * stride_xk,
                         mask=(cols[None, :] < M) & (kk[:, None] < K), other=0.0)
            if UPCAST:  # fp32 inputs (and bf16 under the interpreter, whose bf16 dot is wrong)
                acc += tl.dot(a.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
            else:  # bf16 / fp16 tensor-core product, fp32 accumulate
                acc += tl.dot(a, bt)
        acc = acc * alpha
        out_mask = (rows[:, None] < M) & (cols[None, :] < M)
        if HAS_C:
            c = tl.load(C_ptr + bat * stride_cb + rows[:, None] * M + cols[None, :], mask=out_mask, other=0.0)
            acc += beta * c.to(tl.float32)
        val = acc.to(S_ptr.dtype.element_ty)
        s_base = S_ptr + bat * stride_sb
        tl.store(s_base + rows[:, None] * M + cols[None, :], val, mask=out_mask)
        if tj < ti:  # the mirror tile, stored transposed so that its writes run along rows too
            tl.store(s_base + cols[:, None] * M + rows[None, :], tl.trans(val), mask=tl.trans(out_mask))


#: the symmetric product's tiles: the shipped 64×32 with 4 warps ran msign of a 4096² bf16 matrix
#: at 0.75× torch's own Polar Express on an H100; tuned over these, 1.17–1.24×
_SYRK = Tiled(_syrk_kernel, ("BLOCK_M", "BLOCK_K"), (64, 32),
              [(64, 64, 4, 4), (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3)],
              key=["M", "K", "HAS_C", "UPCAST"])


def sym_product(X: torch.Tensor, alpha: float = 1.0, C: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """α X Xᵀ + β C for X (B, M, K) with C (B, M, M) symmetric; one triangle computed, fp32 accumulate."""
    if X.ndim != 3:
        raise ValueError(f"sym_product: expected X of shape (B, M, K), got {tuple(X.shape)}")
    Bn, M, K = X.shape
    S = torch.empty((Bn, M, M), device=X.device, dtype=X.dtype)
    if C is not None:
        if C.shape != (Bn, M, M):
            raise ValueError(f"sym_product: C must have shape {(Bn, M, M)}, got {tuple(C.shape)}")
        C = C.contiguous()
    if Bn and M:
        small = {"BLOCK_M": 64 if M > 32 else (32 if M > 16 else 16), "BLOCK_K": 32 if K > 16 else 16}  # shipped
        _SYRK.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(M, meta["BLOCK_M"]), Bn),
                     X, C if C is not None else S, S, M, K, float(alpha), float(beta),
                     X.stride(0), X.stride(1), X.stride(2), M * M, M * M,
                     HAS_C=C is not None, UPCAST=X.dtype == torch.float32 or interpreting(),
                     shipped=small)
    return S


def msign(X: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Polar Express polar factor U Vᵀ (same contract as ``reference.msign``) with Triton Gram products.
    Inputs are validated, and ``supports`` asked, by ``modula_mhc.kernels.msign``."""
    coeffs = msign_coeffs(steps)
    if X.size(-2) == 0 or X.size(-1) == 0:  # an empty matrix: as the reference
        return X.clone()
    transposed = X.size(-2) > X.size(-1)
    Y = X.mT if transposed else X
    shape = Y.shape
    Y = msign_normalise(Y.reshape(-1, shape[-2], shape[-1])).contiguous()
    for k, (a, b, c) in enumerate(coeffs):
        S = sym_product(Y)                    # X Xᵀ
        if k == 0:  # the reference's tight start (msign_start)
            Y, S = msign_tighten(Y, S)
        B = sym_product(S, alpha=c, C=S, beta=b)  # c S Sᵀ + b S = b S + c S²
        Y = torch.baddbmm(Y, B, Y, beta=a)    # a Y + B Y
    Y = Y.reshape(shape)
    return Y.mT if transposed else Y
