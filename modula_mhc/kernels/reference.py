"""PyTorch reference implementations of the hot kernels.

These are the ground truth the Triton kernels are tested against, and the code path used on CPU.
Nothing here imports triton. One module per kernel family; this one re-exports their public names:

- ``msign``: polar factor U Vᵀ of X = U Σ Vᵀ by the Polar Express iteration (here).
- ``sinkhorn``: Sinkhorn–Knopp normalisation of exp(logits) with an exact, recomputing backward
  (``sinkhorn_reference``).
- ``mhc_coeff_input``, ``mhc_pre``, ``mhc_post_res``: mHC stream mixing (``mhc_reference``).
"""

from __future__ import annotations

import functools

import torch

from .mhc_reference import mhc_coeff_input, mhc_post_res, mhc_pre
from .sinkhorn_reference import SinkhornConvergenceWarning, sinkhorn, sinkhorn_tol_floor

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "msign",
    "polar_express_gain",
    "msign_coeffs",
    "sinkhorn",
    "sinkhorn_tol_floor",
    "SinkhornConvergenceWarning",
    "mhc_coeff_input",
    "mhc_pre",
    "mhc_post_res",
]

# --------------------------------------------------------------------------------------------
# msign: Polar Express
# --------------------------------------------------------------------------------------------

# Degree-5 odd polynomials p(x) = a x + b x³ + c x⁵ from Amsel, Persson, Musco & Gower (2025),
# "The Polar Express", Algorithm 1. Steps beyond the 8th reuse the last triple (it is the fixed
# point of the optimisation). The first seven are shrunk by 1.01, 1.01³, 1.01⁵ so that rounding
# never pushes a singular value past the polynomial's stable range.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_SAFETY = 1.01
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = tuple(
    (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)



def polar_express_coeffs(steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) triple for each of ``steps`` iterations (the last triple repeats past 8)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"msign: steps must be a positive int, got {steps!r}")
    last = POLAR_EXPRESS_COEFFS[-1]
    return [POLAR_EXPRESS_COEFFS[k] if k < len(POLAR_EXPRESS_COEFFS) else last for k in range(steps)]


def msign_coeffs(steps: int) -> list[tuple[float, float, float]]:
    """The triples ``msign(X, steps)`` applies: Polar Express steps 2 … steps + 1. Its start (X scaled
    by 1.01·‖XXᵀ‖_F^{1/2} ≥ 1.01·σ_max, ``msign_start``) takes the place of step 1: σ_max lands in
    [rank^(-1/4), 1]/1.01 instead of at ‖X‖₂/‖X‖_F ≥ rank^(-1/2), inside what step 2 is designed
    for, so 6 steps reach the accuracy 7 plain Polar Express steps reach."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"msign: steps must be a positive int, got {steps!r}")
    return polar_express_coeffs(steps + 1)[1:]


@functools.lru_cache(maxsize=None)
def polar_express_gain(steps: int) -> float:
    """max over σ ∈ (0, 1/1.01] of the polynomials ``msign_coeffs(steps)`` composed: the largest
    singular value ``msign`` can return in exact arithmetic (the iterates equioscillate around 1;
    > 1 when ``steps`` < 7)."""
    x = torch.logspace(-9, 0, 200001, dtype=torch.float64) / _SAFETY
    for a, b, c in msign_coeffs(steps):
        x = x * (a + x * x * (b + c * x * x))
    return float(x.max())


def _positive_or_one(t: torch.Tensor) -> torch.Tensor:
    """t where positive, else 1: a zero matrix divided by it stays zero. No additive epsilon: a fixed
    one swamped the norms of tiny inputs (‖X‖_F = 6e-19 gave singular values of 0.006-0.02)."""
    return torch.where(t > 0, t, torch.ones_like(t))


def msign_normalise(X: torch.Tensor) -> torch.Tensor:
    """X / (1.01·‖X‖_F) per matrix (zero stays zero), in fp32 (or fp64), result in X's dtype.
    X is first divided by its largest |entry|, so squaring it for the norm cannot overflow (fp32
    entries of 1e18 gave 0) or underflow (entries of 1e-30)."""
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    Xa = X.to(acc)
    Xa = Xa / _positive_or_one(Xa.abs().amax(dim=(-2, -1), keepdim=True))
    norm = torch.linalg.vector_norm(Xa, dim=(-2, -1), keepdim=True)
    return (Xa / _positive_or_one(norm * _SAFETY)).to(X.dtype)


def msign_tighten(Y: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S) / (1.01·‖S‖_F^{1/2}, its square) for S = YYᵀ: then σ_max(Y) ≤ 1/1.01, since
    ‖S‖_F = (Σσ⁴)^{1/2} ≥ σ_max², a much tighter bound than ‖Y‖_F that costs no extra product.
    Y comes from ``msign_normalise`` (‖Y‖_F ≈ 1/1.01), so ‖S‖_F is in [1/rank, 1]: no overflow."""
    acc = torch.float64 if S.dtype == torch.float64 else torch.float32
    scale = _positive_or_one(torch.linalg.vector_norm(S, dim=(-2, -1), keepdim=True, dtype=acc).sqrt() * _SAFETY)
    return Y / scale.to(Y.dtype), S / scale.square().to(S.dtype)


def msign_start(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S = YYᵀ) for a batched wide or square Y, scaled to σ_max ≤ 1/1.01: first by max|Y| and
    1.01·‖Y‖_F (``msign_normalise``: any finite scale lands in range), then ``msign_tighten`` (S is
    the first step's Gram matrix anyway)."""
    Y = msign_normalise(Y)
    return msign_tighten(Y, torch.bmm(Y, Y.mT))


#: a matrix whose long side is at least this many times its short side iterates in the Gram space
#: of its short side (``_polar_express_gram``): per step 4n³ instead of 2n²m + n³ multiply-adds
GRAM_ROUTE_ASPECT = 3


def _polar_express_step(Y: torch.Tensor, a: float, b: float, c: float, S: torch.Tensor | None = None) -> torch.Tensor:
    """Y ← a Y + (b S + c S²) Y with S = Y Yᵀ (Y wide or square, batched; S given or formed)."""
    if S is None:
        S = torch.bmm(Y, Y.mT)
    B = torch.baddbmm(S, S, S, beta=b, alpha=c)  # b S + c S², one fused matmul-add
    return torch.baddbmm(Y, B, Y, beta=a)  # a Y + B Y


def _polar_express_gram(Y: torch.Tensor, S: torch.Tensor, coeffs) -> torch.Tensor:
    """The Polar Express steps ``coeffs`` on a wide Y (n×m, m ≫ n, S = YYᵀ) carried out on n×n matrices.

    Every iterate is Q·Y₀ with Q a polynomial in S₀ = Y₀Y₀ᵀ, so a step is T = aI + bS + cS²,
    Q ← QT, S ← TST (the Gram matrix of the new iterate), and Y₀ is multiplied once at the end.
    S is updated through the bounded T (‖T‖ ≤ a), never as Q S₀ Qᵀ: Q grows like 1/σ_min and would
    turn fp32 rounding of tiny singular values into huge ones. The last step is taken on the
    m-wide iterate itself, so what rounding the n×n loop leaves is contracted away.
    """
    *head, last = coeffs
    eye = torch.eye(Y.size(-2), dtype=Y.dtype, device=Y.device)
    Q = None
    for a, b, c in head:
        T = torch.baddbmm(S, S, S, beta=b, alpha=c).add_(eye, alpha=a)  # aI + bS + cS²
        Q = T if Q is None else torch.bmm(Q, T)
        S = torch.bmm(torch.bmm(T, S), T)
    if Q is None:
        return _polar_express_step(Y, *last, S=S)
    return _polar_express_step(torch.bmm(Q, Y), *last)


def msign(X: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Polar factor U Vᵀ of X = U Σ Vᵀ (matrix sign), batched over leading dims.

    X scaled so that σ_max ≤ 1/1.01 (``msign_start``: by ‖XXᵀ‖_F^{1/2}, in place of Polar Express's
    first step), then ``steps`` times X ← a X + (b S + c S²) X with S = X Xᵀ on the smaller side
    (Polar Express steps 2 … steps + 1, ``msign_coeffs``), so every singular value σ ∈ (0, 1] is
    mapped by p(σ) = aσ + bσ³ + cσ⁵ towards 1. fp32/fp64 matrices with aspect ratio ≥
    ``GRAM_ROUTE_ASPECT`` run all but the last step on the small side's Gram matrix (same
    polynomials, fewer flops).

    Computes in the input dtype (bf16 matmuls accumulate in fp32 inside torch); returns that dtype.
    A zero matrix maps to zero, an empty one (m×0, 0×n) to itself. Accuracy per dtype and shape:
    tests/test_kernels_reference.py and docs/kernels.md (square matrices have σ_min/‖X‖_F below the
    range Polar Express is tuned for, so their smallest few singular values can stay below 1; in
    float32/float64 none exceeds 1 + 1e-3 — 1 + 5e-7 measured — while bf16 / fp16 results carry
    their own rounding, up to 1 + 4.3e-3 / 1 + 6.1e-4 measured). The dual ratio ⟨X, A⟩/‖X‖_* is
    Σσ_i p(σ_i)/Σσ_i: singular values far below σ_max (x < ~1e-2 after scaling) are not yet mapped
    to 1, so with few steps it drops where they carry much of the nuclear norm (6 steps: 0.967 for
    a 128² spike with a flat tail at 3e-3, tests/test_kernel_audit.py).
    X is validated by ``modula_mhc.kernels.msign``, the public entry point.
    """
    coeffs = msign_coeffs(steps)
    if X.size(-2) == 0 or X.size(-1) == 0:  # m×0 or 0×n: nothing to orthogonalise (the reshape
        return X.clone()                      # below cannot infer the batch of an empty matrix)
    transposed = X.size(-2) > X.size(-1)
    Y = X.mT if transposed else X
    shape = Y.shape
    Y, S = msign_start(Y.reshape(-1, shape[-2], shape[-1]))
    # fp32/fp64 only: in bf16/fp16 the n×n loop's rounding (squared condition number) made
    # low-rank inputs non-finite
    if shape[-1] >= GRAM_ROUTE_ASPECT * shape[-2] and steps > 1 and Y.dtype in (torch.float32, torch.float64):
        Y = _polar_express_gram(Y, S, coeffs)
    else:
        for a, b, c in coeffs:
            Y = _polar_express_step(Y, a, b, c, S=S)
            S = None
    Y = Y.reshape(shape)
    return Y.mT if transposed else Y
