"""Exact polar factor through the small Gram matrix: X·(XᵀX)^(-1/2), eigendecomposition in float64.

On a CPU an n×n eigendecomposition costs a few n×n matmuls, while Polar Express needs ~24 of
them plus two m×n×n products per step, so this is both cheaper and exact there; on accelerators
the matmul-only Polar Express (``msign``) is the faster route (``kernels.polar`` picks).
"""
from __future__ import annotations

import torch

#: singular values below this fraction of the largest map to 0 (pseudo-inverse square root)
RCOND = 1e-7


def _tall(X):
    wide = X.size(-2) < X.size(-1)
    return (X.mT if wide else X), wide


def gram_polar(X: torch.Tensor, strict: bool = False, refine: bool = True) -> torch.Tensor:
    """Polar factor U Vᵀ of X = U Σ Vᵀ, batched over leading dims, in X's dtype.

    Computes Xᵀ X (smaller side), its eigendecomposition V diag(e) Vᵀ in float64, and X·V e^(-1/2) Vᵀ.
    Ill-conditioned input (σ_min/σ_max < 0.03) is recomputed from a float64 Gram matrix and
    polished by one Newton–Schulz step, so the result is orthogonal to float rounding up to
    condition numbers ~1e7. Singular values below
    ``RCOND``·σ_max map to 0 (zero stays zero, as for ``msign``), unless ``strict``: then a
    (numerically) rank-deficient X raises ValueError, since its polar factor is not unique.
    ``refine=False`` skips the float64 recomputation (an optimizer direction needs no more than
    the float32 Gram matrix resolves: singular values below ~3e-4·σ_max are then inexact).
    """
    if not X.is_floating_point() or X.ndim < 2:
        raise TypeError(f"gram_polar: expected a floating-point (..., m, n) tensor, got {X.dtype} {tuple(X.shape)}")
    Y, wide = _tall(X)
    out_dtype = X.dtype
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    Y = Y.to(work)
    amax = Y.abs().amax(dim=(-2, -1), keepdim=True)
    Y = Y / torch.where(amax > 0, amax, torch.ones_like(amax))
    # float64 eigendecomposition for exactness; a float32 one (half the cost) where only an
    # optimizer direction is wanted (refine=False)
    e, V = torch.linalg.eigh((Y.mT @ Y).to(torch.float64 if refine else work))
    emax = e[..., -1:].clamp_min(0)
    if refine and work != torch.float64 and bool((e[..., :1] < 1e-3 * emax).any()):
        # the float32 Gram matrix loses the small singular values: redo it in float64
        Y = Y.to(torch.float64)
        e, V = torch.linalg.eigh(Y.mT @ Y)
        emax = e[..., -1:].clamp_min(0)
    floor = (RCOND ** 2 if e.dtype == torch.float64 else 1e-7) * emax
    if strict and bool(((e[..., :1] <= floor) & (emax > 0)).any()):
        raise ValueError(f"polar factor of a rank-deficient matrix (σ_min/σ_max < {RCOND:g}) is not unique; "
                         "cannot retract it onto the manifold")
    tiny = torch.finfo(e.dtype).tiny
    inv = torch.where(e > floor.clamp_min(tiny), e.clamp_min(tiny).rsqrt(), torch.zeros_like(e))
    R = (V * inv.unsqueeze(-2)) @ V.mT
    # Y + Y(R − I): near the manifold R − I is small, so the result keeps Y to float rounding
    # (a retraction that is the identity on the manifold) instead of re-rounding a product
    eye = torch.eye(R.size(-1), dtype=R.dtype, device=R.device)
    Q = Y + Y @ (R - eye).to(Y.dtype)
    if refine and Y.dtype == torch.float64 and bool((e[..., :1] < 1e-3 * emax).any()):
        # ill-conditioned: the Gram route leaves QᵀQ − I ~ ε·cond²; one Newton–Schulz step
        # Q(3I − QᵀQ)/2 squares that error
        Q = Q @ (1.5 * eye - 0.5 * (Q.mT @ Q))
    Q = Q.to(out_dtype)
    return Q.mT if wide else Q
