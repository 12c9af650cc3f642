"""Exact polar factor through the small Gram matrix: X·(XᵀX)^(-1/2), eigendecomposition in float64.

On a CPU an n×n eigendecomposition costs a few n×n matmuls, while Polar Express needs ~24 of
them plus two m×n×n products per step, so this is both cheaper and exact there; on accelerators
the matmul-only Polar Express (``msign``) is the faster route (``kernels.polar`` picks).
"""
from __future__ import annotations

import math

import torch

#: singular values below this fraction of the largest map to 0 (pseudo-inverse square root)
RCOND = 1e-7
#: the same for optimizer directions (``refine=False``): what a float32 direction can resolve
DIRECTION_RCOND = 1e-4
#: ill-conditioned input (``refine=True``): at most this many Newton–Schulz steps after the first,
#: until max|QᵀQ − I| ≤ POLISH_TOL (float64); each squares the error the Gram route leaves
POLISH_STEPS = 3
POLISH_TOL = 1e-12
#: retraction inputs whose Gram matrix is this close to a multiple of I (‖YᵀY/c − I‖_F ≤ this, c =
#: tr(YᵀY)/n) take Newton–Schulz steps instead of the eigendecomposition: an optimizer step W − lr·A
#: from a point of the manifold is such an input (its Gram matrix is I + lr²AᵀA for Stiefel), and
#: 4–6 steps of 2 products cost less than one float64 eigh (128×128: 24 retractions of an anchor GPT
#: step took 88 ms through eigh)
NEAR_ORTHOGONAL = 0.5


def _tall(X):
    wide = X.size(-2) < X.size(-1)
    return (X.mT if wide else X), wide


def _newton_schulz_polar(Y: torch.Tensor, S: torch.Tensor) -> torch.Tensor | None:
    """Polar factor of tall Y (Gram matrix S = YᵀY) by Newton–Schulz steps Q ← Q(I − D/2), D = QᵀQ − I,
    from Q = Y/√c (c = tr S/n: the polar factor ignores scale), or None when ‖S/c − I‖_F >
    ``NEAR_ORTHOGONAL``. Each step maps an eigenvalue d of D to −¾d² + ¼d³, so the number of steps
    until ‖D‖_F ≤ 8ε follows from the first ‖D‖_F (one host sync); the result is the polar factor
    to rounding, and an input on the manifold moves by rounding only."""
    if S.numel() == 0:  # an empty batch: the eigh route returns it as it is
        return None
    n = S.size(-1)
    eye = torch.eye(n, dtype=S.dtype, device=S.device)
    c = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)[..., None, None] / n
    D = S / torch.where(c > 0, c, torch.ones_like(c)) - eye
    delta = float(torch.where(c > 0, torch.linalg.vector_norm(D, dim=(-2, -1), keepdim=True), math.inf).amax())
    if not delta <= NEAR_ORTHOGONAL:  # far from orthogonal, a zero matrix, or NaN: the eigh route
        return None
    tol = 8 * torch.finfo(S.dtype).eps
    Q = Y / c.sqrt()
    while True:
        Q = Q - Q @ (0.5 * D)
        delta = 0.75 * delta ** 2 + 0.25 * delta ** 3
        if delta <= tol:
            return Q
        D = Q.mT @ Q - eye


def gram_polar(X: torch.Tensor, strict: bool = False, refine: bool = True) -> torch.Tensor:
    """Polar factor U Vᵀ of X = U Σ Vᵀ, batched over leading dims, in X's dtype.

    X·V e^(-1/2) Vᵀ from the eigendecomposition V diag(e) Vᵀ of XᵀX (smaller side), in float64.

    ``refine=True`` (retractions): ill-conditioned input (σ_min/σ_max < 0.03) is recomputed from a
    float64 Gram matrix and polished by Newton–Schulz steps until QᵀQ = I to rounding (at most
    1 + ``POLISH_STEPS``), so the result is orthogonal to float rounding up to condition numbers
    ~1e7 (one step left 1.5e-4 at 9e6). Polishing fixes orthogonality, not the Gram route's error
    in the polar factor itself (float64 at condition 9e6: 1.5e-5–3.3e-5 from U Vᵀ, where an SVD
    is within 5e-10). Singular values below ``RCOND``·σ_max map to 0, or, with
    ``strict``, raise ValueError (the polar factor of a rank-deficient matrix is not unique).
    ``refine=False`` (optimizer directions): float64 Gram matrix, and singular values below
    ``DIRECTION_RCOND``·σ_max map to 0 — below that a float32 result cannot resolve them, and
    keeping them could push the spectral norm above 1. Zero stays zero, as for ``msign``.
    """
    if not X.is_floating_point() or X.ndim < 2:
        raise TypeError(f"gram_polar: expected a floating-point (..., m, n) tensor, got {X.dtype} {tuple(X.shape)}")
    if X.size(-2) == 0 or X.size(-1) == 0:  # an empty matrix (m×0, 0×n): its own polar factor
        return X.clone()
    Y, wide = _tall(X)
    out_dtype = X.dtype
    work = torch.float64 if (X.dtype == torch.float64 or not refine) else torch.float32
    Y = Y.to(work)
    amax = Y.abs().amax(dim=(-2, -1), keepdim=True)
    Y = Y / torch.where(amax > 0, amax, torch.ones_like(amax))
    S = Y.mT @ Y
    if refine:
        Q = _newton_schulz_polar(Y, S)
        if Q is not None:
            Q = Q.to(out_dtype)
            return Q.mT if wide else Q
    e, V = torch.linalg.eigh(S.to(torch.float64))
    emax = e[..., -1:].clamp_min(0)
    ill = bool((e[..., :1] < 1e-3 * emax).any())
    if refine and work != torch.float64 and ill:
        # the float32 Gram matrix loses the small singular values: redo it in float64
        Y = Y.to(torch.float64)
        e, V = torch.linalg.eigh(Y.mT @ Y)
        emax = e[..., -1:].clamp_min(0)
    floor = ((RCOND if refine else DIRECTION_RCOND) ** 2) * emax
    if strict and bool(((e[..., :1] <= floor) & (emax > 0)).any()):
        raise ValueError(f"polar factor of a rank-deficient matrix (σ_min/σ_max < {RCOND:g}) is not unique; "
                         "cannot retract it onto the manifold")
    inv = torch.where(e > floor.clamp_min(1e-300), e.clamp_min(1e-300).rsqrt(), torch.zeros_like(e))
    R = (V * inv.unsqueeze(-2)) @ V.mT
    # Y + Y(R − I): near the manifold R − I is small, so the result keeps Y to float rounding
    # (a retraction that is the identity on the manifold) instead of re-rounding a product
    eye = torch.eye(R.size(-1), dtype=R.dtype, device=R.device)
    Q = Y + Y @ (R - eye).to(Y.dtype)
    if refine and (ill or bool((e[..., :1] < 0.5 * emax).any())):
        # the Gram route leaves QᵀQ − I ~ ε·cond²; one Newton–Schulz step Q(3I − QᵀQ)/2 squares
        # that error (near-orthogonal input, the optimizer's case, needs none)
        eye_q = torch.eye(Q.size(-1), dtype=Q.dtype, device=Q.device)
        Q = Q @ (1.5 * eye_q - 0.5 * (Q.mT @ Q))
        if ill:
            # at condition 1e6-1e7 one step leaves (ε·cond²)² ~ 1e-4 (float64 work): QᵀQ − I reached
            # 1.5e-4 at σ_min/σ_max = 1/9e6, where the claim is orthogonal to rounding up to ~1e7.
            # Each further step squares it again; stop once QᵀQ = I to rounding (Q is float64 here)
            for _ in range(POLISH_STEPS):
                QtQ = Q.mT @ Q
                if float((QtQ - eye_q).abs().amax()) <= POLISH_TOL:
                    break
                Q = Q @ (1.5 * eye_q - 0.5 * QtQ)
    Q = Q.to(out_dtype)
    return Q.mT if wide else Q
