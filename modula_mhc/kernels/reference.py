"""PyTorch reference implementations of the hot kernels.

These are the ground truth the Triton kernels are tested against, and the code path used on CPU.
Nothing here imports triton.

- ``msign``: polar factor U Vᵀ of X = U Σ Vᵀ by the Polar Express iteration.
- ``sinkhorn``: Sinkhorn–Knopp normalisation of exp(logits) with an exact, recomputing backward.
- ``sinkhorn_project``: the same map applied to log W (Sinkhorn–Knopp scaling of a positive W).
- ``mhc_coeff_input``, ``mhc_pre``, ``mhc_post_res``: mHC stream mixing.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "msign",
    "polar_express_gain",
    "sinkhorn",
    "sinkhorn_project",
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

_MSIGN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Added to the Frobenius norm so that a zero matrix is divided by a positive number (0 -> 0).
_MSIGN_TINY = 1e-7


def polar_express_coeffs(steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) triple for each of ``steps`` iterations (the last triple repeats past 8)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"msign: steps must be a positive int, got {steps!r}")
    last = POLAR_EXPRESS_COEFFS[-1]
    return [POLAR_EXPRESS_COEFFS[k] if k < len(POLAR_EXPRESS_COEFFS) else last for k in range(steps)]


@functools.lru_cache(maxsize=None)
def polar_express_gain(steps: int) -> float:
    """max over σ ∈ (0, 1/1.01] of p_steps∘…∘p_1(σ): the largest singular value ``msign`` can
    return in exact arithmetic (the iterates equioscillate around 1; > 1 when ``steps`` < 8)."""
    x = torch.logspace(-9, 0, 200001, dtype=torch.float64) / _SAFETY
    for a, b, c in polar_express_coeffs(steps):
        x = x * (a + x * x * (b + c * x * x))
    return float(x.max())


def _check_msign_input(X: torch.Tensor) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"msign: expected a torch.Tensor, got {type(X).__name__}")
    if X.ndim < 2:
        raise ValueError(f"msign: expected shape (..., m, n), got {tuple(X.shape)}")
    if X.dtype not in _MSIGN_DTYPES:
        raise TypeError(f"msign: unsupported dtype {X.dtype}; use float32, bfloat16, float16 or float64")


def msign_normalise(X: torch.Tensor) -> torch.Tensor:
    """X / (1.01·‖X‖_F + tiny) per matrix, norm taken in fp32 (or fp64), result in X's dtype."""
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    Xa = X.to(acc)
    norm = torch.linalg.vector_norm(Xa, dim=(-2, -1), keepdim=True)
    return (Xa / (norm * _SAFETY + _MSIGN_TINY)).to(X.dtype)


#: a matrix whose long side is at least this many times its short side iterates in the Gram space
#: of its short side (``_polar_express_gram``): per step 4n³ instead of 2n²m + n³ multiply-adds
GRAM_ROUTE_ASPECT = 3


def _polar_express_step(Y: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """Y ← a Y + (b S + c S²) Y with S = Y Yᵀ (Y wide or square, batched)."""
    S = torch.bmm(Y, Y.mT)
    B = torch.baddbmm(S, S, S, beta=b, alpha=c)  # b S + c S², one fused matmul-add
    return torch.baddbmm(Y, B, Y, beta=a)  # a Y + B Y


def _polar_express_gram(Y: torch.Tensor, coeffs) -> torch.Tensor:
    """The Polar Express steps ``coeffs`` on a wide Y (n×m, m ≫ n) carried out on n×n matrices.

    Every iterate is Q·Y₀ with Q a polynomial in S₀ = Y₀Y₀ᵀ, so a step is T = aI + bS + cS²,
    Q ← QT, S ← TST (the Gram matrix of the new iterate), and Y₀ is multiplied once at the end.
    S is updated through the bounded T (‖T‖ ≤ a), never as Q S₀ Qᵀ: Q grows like 1/σ_min and would
    turn fp32 rounding of tiny singular values into huge ones. The last step is taken on the
    m-wide iterate itself, so what rounding the n×n loop leaves is contracted away.
    """
    *head, last = coeffs
    S = torch.bmm(Y, Y.mT)
    eye = torch.eye(Y.size(-2), dtype=Y.dtype, device=Y.device)
    Q = None
    for a, b, c in head:
        T = torch.baddbmm(S, S, S, beta=b, alpha=c).add_(eye, alpha=a)  # aI + bS + cS²
        Q = T if Q is None else torch.bmm(Q, T)
        S = torch.bmm(torch.bmm(T, S), T)
    if Q is not None:
        Y = torch.bmm(Q, Y)
    return _polar_express_step(Y, *last)


def msign(X: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Polar factor U Vᵀ of X = U Σ Vᵀ (matrix sign), batched over leading dims.

    X ← X / (1.01‖X‖_F), then ``steps`` times X ← a X + (b S + c S²) X with S = X Xᵀ on the
    smaller side, so every singular value σ ∈ (0, 1] is mapped by p(σ) = aσ + bσ³ + cσ⁵ towards 1.
    Matrices with aspect ratio ≥ ``GRAM_ROUTE_ASPECT`` run all but the last step on the small
    side's Gram matrix (same polynomials, fewer flops).

    Computes in the input dtype (bf16 matmuls accumulate in fp32 inside torch); returns that dtype.
    A zero matrix maps to zero. Accuracy per dtype and shape: tests/test_kernels_reference.py and
    docs/kernels.md (square matrices have σ_min/‖X‖_F below the range Polar Express is tuned for,
    so their smallest few singular values can stay below 1; none exceeds 1 + 1e-3).
    """
    _check_msign_input(X)
    coeffs = polar_express_coeffs(steps)
    transposed = X.size(-2) > X.size(-1)
    Y = X.mT if transposed else X
    shape = Y.shape
    Y = msign_normalise(Y.reshape(-1, shape[-2], shape[-1]))
    if shape[-1] >= GRAM_ROUTE_ASPECT * shape[-2] and steps > 1:
        Y = _polar_express_gram(Y, coeffs)
    else:
        for a, b, c in coeffs:
            Y = _polar_express_step(Y, a, b, c)
    Y = Y.reshape(shape)
    return Y.mT if transposed else Y


# --------------------------------------------------------------------------------------------
# Sinkhorn–Knopp
# --------------------------------------------------------------------------------------------

# Above this spread (max - min of a row of logits) the exp-domain iteration could underflow a
# whole column on its first step (exp(-60) ≈ 9e-27 leaves 11 orders of magnitude of fp32 headroom);
# such inputs take the log-domain path instead.
_EXP_DOMAIN_MAX_SPREAD = 60.0
# Upper bound on the bytes of iterates held at once by the backward recomputation.
_BACKWARD_CHUNK_BYTES = 256 * 2**20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: what tolerance mode does when ``max_iters`` is reached before the marginal error is below tol
NONCONVERGENCE = ("warn", "raise", "ignore")


class SinkhornConvergenceWarning(RuntimeWarning):
    """Tolerance-mode Sinkhorn reached ``max_iters`` with a marginal error still ≥ ``tol``."""


def sinkhorn_tol_floor(dtype: torch.dtype) -> float:
    """Smallest ``tol`` that tolerance mode accepts for logits of ``dtype``: 8 units of roundoff of
    the compute dtype (float32 for float32/bfloat16/float16 logits: 9.5e-7; float64: 1.8e-15).
    Row sums of a converged iterate still carry a few ulps of rounding (measured up to 2.4e-7 in
    float32), so a smaller tol would only run to ``max_iters``."""
    return 8.0 * torch.finfo(_compute_dtype(dtype)).eps


def _check_sinkhorn_input(logits: torch.Tensor, iters: int, tol, max_iters: int, nonconvergence="warn") -> None:
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
            acc = _compute_dtype(logits.dtype)
            raise ValueError(f"sinkhorn: tol={tol:g} is below what {str(acc).replace('torch.', '')} arithmetic "
                             f"can reach for {str(logits.dtype).replace('torch.', '')} logits (floor {floor:.3g}: "
                             "row sums carry that much rounding); use tol >= the floor, or float64 logits")
    if nonconvergence not in NONCONVERGENCE:
        raise ValueError(f"sinkhorn: nonconvergence must be one of {NONCONVERGENCE}, got {nonconvergence!r}")


# Internally the matrices are stored batch-last, shape (n, n, B): entry [i, j, b] is row i, column
# j of matrix b. Reductions over i or j then run over contiguous runs of B values (vectorised),
# which on CPU is 5-15x faster per op than reducing the size-n inner dim of (B, n, n).
_ROW, _COL = 1, 0  # summing over dim 1 gives row sums, over dim 0 column sums


def _to_batch_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = t.size(-1)
    return t.reshape(-1, n, n).to(dtype).permute(1, 2, 0).contiguous()


def _from_batch_last(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return t.permute(2, 0, 1).to(dtype).contiguous().reshape(shape)


def _row_spread(Lt: torch.Tensor) -> float:
    """Largest max−min over rows; raises on non-finite logits (one host sync)."""
    if Lt.numel() == 0:
        return 0.0
    spread = float((Lt.amax(_ROW) - Lt.amin(_ROW)).amax())
    if not math.isfinite(spread):
        raise ValueError("sinkhorn: logits contain inf or NaN")
    return spread


def _marginal_error(Pt: torch.Tensor) -> torch.Tensor:
    """max over the batch of |row sum − 1| and |column sum − 1| (0-dim tensor)."""
    if Pt.numel() == 0:
        return Pt.new_zeros(())
    row = (Pt.sum(_ROW) - 1).abs().amax()
    col = (Pt.sum(_COL) - 1).abs().amax()
    return torch.maximum(row, col)


def _first_row_step(Lt: torch.Tensor, log_domain: bool) -> torch.Tensor:
    """Row-normalised exp(L) (a softmax over each row); log of it in the log domain."""
    if log_domain:
        return Lt - torch.logsumexp(Lt, dim=_ROW, keepdim=True)
    P = (Lt - Lt.amax(_ROW, keepdim=True)).exp_()
    return P.div_(P.sum(_ROW, keepdim=True))


def _half_step(X: torch.Tensor, dim: int, log_domain: bool, inplace: bool) -> torch.Tensor:
    if log_domain:
        return X - torch.logsumexp(X, dim=dim, keepdim=True)
    s = X.sum(dim, keepdim=True)
    return X.div_(s) if inplace else X / s


def _iterates(Lt: torch.Tensor, n_iters: int, log_domain: bool, keep: bool):
    """Run ``n_iters`` Sinkhorn iterations (rows then columns) on batch-last logits (n, n, B).

    Returns (P, states): states lists every half-step's normalised matrix P_k (k = 1..2T,
    probabilities, not logs) when ``keep`` is set (the backward pass needs them), else is empty.
    """
    states = []
    X = _first_row_step(Lt, log_domain)
    for it in range(n_iters):
        if it > 0:
            X = _half_step(X, _ROW, log_domain, inplace=not keep)
        if keep:
            states.append(X.exp() if log_domain else X)
        X = _half_step(X, _COL, log_domain, inplace=not keep)
        if keep:
            states.append(X.exp() if log_domain else X)
    return (X.exp() if log_domain else X), states


def _run_to_tol(Lt: torch.Tensor, tol: float, max_iters: int, log_domain: bool):
    """Iterate until max |row sum − 1| < tol (columns are exact after each iteration)."""
    X = _half_step(_first_row_step(Lt, log_domain), _COL, log_domain, inplace=True)
    n = 1
    while n < max_iters:
        P = X.exp() if log_domain else X
        if float((P.sum(_ROW) - 1).abs().amax()) < tol:
            break
        X = _half_step(X, _ROW, log_domain, inplace=True)
        X = _half_step(X, _COL, log_domain, inplace=True)
        n += 1
    return (X.exp() if log_domain else X), n


def _reverse(states: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Reverse-mode through the half-steps, in log-gradient form.

    Each half-step is Y = X − logsumexp_axis(X) in the log domain, whose adjoint is
    g_X = g_Y − P_k · Σ_axis g_Y with P_k = exp(Y) the state after that half-step. The first
    state is a row step and the axes alternate rows / columns. g enters as dP ⊙ P and leaves
    as the gradient with respect to the logits. Updates g in place.
    """
    for k in range(len(states) - 1, -1, -1):
        axis = _ROW if k % 2 == 0 else _COL
        g.addcmul_(states[k], g.sum(dim=axis, keepdim=True), value=-1.0)
    return g


def _reverse_from(Lc: torch.Tensor, n_iters: int, log_domain: bool, dPc: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. batch-last logits Lc: recompute the iterates, then run the adjoint."""
    Pt, states = _iterates(Lc, n_iters, log_domain, keep=True)
    return _reverse(states, dPc * Pt)


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # very old torch
        return False


def _spread_tensor(Lt: torch.Tensor) -> torch.Tensor:
    """Largest max−min over rows as a 0-dim tensor (no host sync)."""
    if Lt.numel() == 0:
        return Lt.new_zeros(())
    return (Lt.amax(_ROW) - Lt.amin(_ROW)).amax()


class _SinkhornFunction(torch.autograd.Function):
    """Sinkhorn with an exact backward that stores only the logits and recomputes the iterates."""

    @staticmethod
    def forward(ctx, logits, iters, tol, max_iters):
        acc = _compute_dtype(logits.dtype)
        Lt = _to_batch_last(logits.detach(), acc)
        if tol is None and _compiling():
            # No host sync under torch.compile: both domains, the same batch-wide choice as eager
            # (a 0-dim bool tensor), selected on the device; the non-finite check is skipped.
            log_domain = _spread_tensor(Lt) > _EXP_DOMAIN_MAX_SPREAD
            Pt = torch.where(log_domain, _iterates(Lt, iters, True, keep=False)[0],
                             _iterates(Lt, iters, False, keep=False)[0])
            n_iters = iters
        elif tol is None:
            log_domain = _row_spread(Lt) > _EXP_DOMAIN_MAX_SPREAD
            Pt, _ = _iterates(Lt, iters, log_domain, keep=False)
            n_iters = iters
        else:
            log_domain = _row_spread(Lt) > _EXP_DOMAIN_MAX_SPREAD
            Pt, n_iters = _run_to_tol(Lt, float(tol), max_iters, log_domain)
        ctx.save_for_backward(logits)
        ctx.n_iters = n_iters
        ctx.log_domain = log_domain
        err = _marginal_error(Pt)
        ctx.mark_non_differentiable(err)
        return _from_batch_last(Pt, logits.shape, logits.dtype), err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_P, grad_err):
        (logits,) = ctx.saved_tensors
        if grad_P is None:
            return None, None, None, None
        acc = _compute_dtype(logits.dtype)
        n = logits.size(-1)
        Lt = _to_batch_last(logits, acc)
        dPt = _to_batch_last(grad_P, acc)
        # Recompute the iterates chunk by chunk so the stored half-steps stay within budget.
        per_matrix = 2 * ctx.n_iters * n * n * (torch.finfo(acc).bits // 8)
        chunk = max(1, _BACKWARD_CHUNK_BYTES // per_matrix)
        grads = []
        for start in range(0, max(Lt.size(-1), 1), chunk):
            Lc = Lt[..., start:start + chunk]
            if isinstance(ctx.log_domain, torch.Tensor):  # compiled forward: select on the device
                g_log = _reverse_from(Lc, ctx.n_iters, True, dPt[..., start:start + chunk])
                g_exp = _reverse_from(Lc, ctx.n_iters, False, dPt[..., start:start + chunk])
                grads.append(torch.where(ctx.log_domain, g_log, g_exp))
            else:
                grads.append(_reverse_from(Lc, ctx.n_iters, ctx.log_domain, dPt[..., start:start + chunk]))
        grad = torch.cat(grads, dim=-1) if len(grads) > 1 else grads[0]
        return _from_batch_last(grad, logits.shape, logits.dtype), None, None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, tol: float | None = None, max_iters: int = 1000,
             return_error: bool = False, nonconvergence: str = "warn"):
    """Doubly-stochastic P = Sinkhorn–Knopp(exp(logits)), batched over (..., n, n).

    Each iteration divides rows by their sums, then columns by theirs, so column sums are exact
    after the last step: P = diag(u) exp(L) diag(v). With ``tol`` set, iterate until
    max |row sum − 1| < tol (at most ``max_iters`` iterations; ``iters`` is then ignored).

    Tolerance mode: ``tol`` below :func:`sinkhorn_tol_floor` of the logits' dtype (9.5e-7 for
    float32/bf16/fp16, 1.8e-15 for float64) raises ValueError — it cannot be met in that
    arithmetic. If ``max_iters`` is reached with a marginal error ≥ tol, ``nonconvergence``
    decides: "warn" (default) issues a :class:`SinkhornConvergenceWarning` naming the error
    reached, "raise" raises RuntimeError, "ignore" says nothing; in every case the result is
    returned and ``return_error=True`` gives the error to check (``err < tol`` ⇔ converged).
    Fixed-iteration mode (``tol=None``) never warns: ask for the error with ``return_error``.

    Computes in fp32 (fp64 for fp64 input), returns the input dtype. The backward is exact for
    the unrolled iteration (not the implicit fixed-point gradient): it stores only the logits,
    recomputes the iterates and runs the adjoint of every half-step. With ``return_error`` returns
    (P, err), err = max over the batch of |row sum − 1| and |column sum − 1| (fp32/fp64 0-dim).
    """
    _check_sinkhorn_input(logits, iters, tol, max_iters, nonconvergence)
    P, err = _SinkhornFunction.apply(logits, iters, tol, max_iters)
    if tol is not None and nonconvergence != "ignore":
        reached = float(err)  # tolerance mode has synchronised every iteration already
        if not reached < tol:
            msg = (f"sinkhorn: tolerance mode stopped at max_iters={max_iters} with marginal error "
                   f"{reached:.3g} >= tol={tol:g} (logits too spread for this cap); raise max_iters, "
                   "or pass return_error=True and check the error")
            if nonconvergence == "raise":
                raise RuntimeError(msg)
            warnings.warn(msg, SinkhornConvergenceWarning, stacklevel=3)
    return (P, err) if return_error else P


def sinkhorn_project(W: torch.Tensor, iters: int = 20, tol: float | None = 1e-5, max_iters: int = 1000,
                     return_error: bool = False, nonconvergence: str = "warn"):
    """Project a strictly positive matrix onto the doubly-stochastic set: sinkhorn(log W).

    Sinkhorn–Knopp scaling diag(u) W diag(v), in the log domain of ``sinkhorn``; by default
    iterates to a marginal tolerance of 1e-5 (capped at ``max_iters``).
    """
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError("sinkhorn_project: expected a floating-point tensor")
    if W.numel() and not bool((W > 0).all()):
        raise ValueError("sinkhorn_project: W must be strictly positive (log W is taken)")
    return sinkhorn(W.log(), iters=iters, tol=tol, max_iters=max_iters, return_error=return_error,
                    nonconvergence=nonconvergence)


# --------------------------------------------------------------------------------------------
# mHC stream mixing. Convention: H_res[..., i, j] weights input stream j in output stream i,
# out_i = Σ_j H_res[i, j] x_j.
# --------------------------------------------------------------------------------------------


def mhc_coeff_input(x_flat: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_flat φ, Σ x_flat²) in fp32: x_flat (..., n·C), φ (n·C, m) → (..., m), (...).

    The fused kernel reads x once for both; the sum of squares feeds the RMS normalisation
    (x̃ φ = x φ / rms(x), so normalising after the product is equivalent and cheaper).
    """
    if x_flat.ndim < 1 or phi.ndim != 2 or x_flat.size(-1) != phi.size(0):
        raise ValueError(f"mhc_coeff_input: expected x (..., K) and phi (K, m), got "
                         f"{tuple(x_flat.shape)} and {tuple(phi.shape)}")
    xf = x_flat.float()
    return xf @ phi.float(), xf.square().sum(-1)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Pre-mix Σ_i h_pre_i x_i: x (..., n, C), h_pre (..., n) → (..., C)."""
    if x.ndim < 2 or h_pre.shape != x.shape[:-1]:
        raise ValueError(f"mhc_pre: expected x (..., n, C) and h_pre (..., n), got "
                         f"{tuple(x.shape)} and {tuple(h_pre.shape)}")
    # a batched (1×n)·(n×C) product: about half the cost of broadcast-multiply-and-sum, fwd+bwd on CPU
    return (h_pre.unsqueeze(-2).to(x.dtype) @ x).squeeze(-2)


def mhc_post_res(x: torch.Tensor, f_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """Post + residual mix out_i = Σ_j h_res[i, j] x_j + h_post_i f_out.

    x (..., n, C), f_out (..., C), h_res (..., n, n), h_post (..., n) → (..., n, C).
    """
    if x.ndim < 2:
        raise ValueError(f"mhc_post_res: expected x (..., n, C), got {tuple(x.shape)}")
    lead, n, C = x.shape[:-2], x.size(-2), x.size(-1)
    if f_out.shape != (*lead, C) or h_res.shape != (*lead, n, n) or h_post.shape != (*lead, n):
        raise ValueError(f"mhc_post_res: shapes do not match x {tuple(x.shape)}: f_out {tuple(f_out.shape)}, "
                         f"h_res {tuple(h_res.shape)}, h_post {tuple(h_post.shape)}")
    dt = x.dtype
    # one batched product [H_res | h_post] · [x; f] reads the (n+1)·C inputs once per token
    # (about 20% cheaper fwd+bwd on CPU than a product plus a broadcast multiply-add)
    mix = torch.cat((h_res.to(dt), h_post.to(dt).unsqueeze(-1)), dim=-1)
    return mix @ torch.cat((x, f_out.unsqueeze(-2)), dim=-2)
