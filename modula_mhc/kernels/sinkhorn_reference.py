"""PyTorch reference of Sinkhorn–Knopp: P = Sinkhorn(exp(logits)) for batches of small n×n
matrices, with an exact backward (iterates kept by the forward, or recomputed from the logits).

- ``sinkhorn``: doubly-stochastic normalisation of exp(logits), fixed iterations or a tolerance.
- ``sinkhorn_tol_floor``: the smallest tolerance the compute dtype can meet.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "NONCONVERGENCE",
    "SinkhornConvergenceWarning",
    "compute_dtype",
    "sinkhorn",
    "sinkhorn_tol_floor",
]

# Above this spread (max - min of a row of logits) the exp-domain iteration could underflow a
# whole column on its first step (exp(-60) ≈ 9e-27 leaves 11 orders of magnitude of fp32 headroom);
# such inputs take the log-domain path instead.
_EXP_DOMAIN_MAX_SPREAD = 60.0
# Upper bound on the bytes of iterates held at once by the backward recomputation.
_BACKWARD_CHUNK_BYTES = 256 * 2**20
# Up to this many bytes of half-step iterates, a forward that needs a gradient keeps them for the
# backward (one recomputation saved: ~3 ms per mHC layer at 4096 tokens); above it, the backward
# recomputes them chunk by chunk from the logits.
_KEEP_STATES_BYTES = 32 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for logits of ``dtype``: float64 stays, everything else runs in float32."""
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
    return 8.0 * torch.finfo(compute_dtype(dtype)).eps


# Internally the matrices are stored batch-last, shape (n, n, B): entry [i, j, b] is row i, column
# j of matrix b. Reductions over i or j then run over contiguous runs of B values (vectorised),
# which on CPU is 5-15x faster per op than reducing the size-n inner dim of (B, n, n).
_ROW, _COL = 1, 0  # summing over dim 1 gives row sums, over dim 0 column sums


def _to_batch_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = t.size(-1)
    return t.reshape(-1, n, n).to(dtype).permute(1, 2, 0).contiguous()


def _from_batch_last(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return t.permute(2, 0, 1).to(dtype).contiguous().reshape(shape)


def _spread_tensor(Lt: torch.Tensor) -> torch.Tensor:
    """Largest max−min over rows as a 0-dim tensor (no host sync)."""
    if Lt.numel() == 0:
        return Lt.new_zeros(())
    return (Lt.amax(_ROW) - Lt.amin(_ROW)).amax()


def _row_spread(Lt: torch.Tensor) -> float:
    """Largest max−min over rows; raises on non-finite logits (one host sync). An infinite spread of
    finite logits (±3e38 in float32) is only an overflow of max−min: it selects the log domain."""
    spread = float(_spread_tensor(Lt))
    if math.isnan(spread) or (math.isinf(spread) and not bool(torch.isfinite(Lt).all())):
        raise ValueError("sinkhorn: logits contain inf or NaN")
    return spread


def _eager_domain(logits: torch.Tensor, Lt: torch.Tensor, acc: torch.dtype):
    """(Lt, acc, log_domain) for eager mode: raises on non-finite logits (``_row_spread``), and when
    finite float32 / bf16 / fp16 logits have a row spread that overflows float32 (|max − min| >
    3.4e38, e.g. ±3e38), runs the iteration in float64 instead: in float32 the first row step sent
    such entries to −inf, and a column of them gave −inf − (−inf) = NaN (``[[3e38, −3e38]] * 2``
    returned all NaN where the exact answer is 1/2 everywhere); float64 holds every such spread."""
    spread = _row_spread(Lt)
    if math.isinf(spread) and acc != torch.float64:
        acc = torch.float64
        Lt = _to_batch_last(logits.detach(), acc)
    return Lt, acc, spread > _EXP_DOMAIN_MAX_SPREAD


def _marginal_error(Pt: torch.Tensor) -> torch.Tensor:
    """max over the batch of |row sum − 1| and |column sum − 1| (0-dim tensor)."""
    if Pt.numel() == 0:
        return Pt.new_zeros(())
    row = (Pt.sum(_ROW) - 1).abs().amax()
    col = (Pt.sum(_COL) - 1).abs().amax()
    return torch.maximum(row, col)


def _result_error(Pt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_marginal_error`` of the matrix as returned in ``dtype`` (no host sync). Rounding to bf16 /
    fp16 moves each row sum by up to half that dtype's eps (3.9e-3 / 4.9e-4), far more than the
    float32 iterate's error, so the iterate's error would overstate the result's accuracy."""
    if Pt.dtype != dtype:
        Pt = Pt.to(dtype).to(Pt.dtype)
    return _marginal_error(Pt)


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

    Returns (P, states): with ``keep``, states is :func:`_states` (every half-step, for the
    backward pass) and P its last entry; without, the iteration runs in place and states is None.
    """
    if keep:
        states = _states(Lt, n_iters, log_domain)
        return states[-1], states
    X = _first_row_step(Lt, log_domain)
    for it in range(n_iters):
        if it > 0:
            X = _half_step(X, _ROW, log_domain, inplace=True)
        X = _half_step(X, _COL, log_domain, inplace=True)
    return (X.exp() if log_domain else X), None


def _states(Lt: torch.Tensor, n_iters: int, log_domain: bool) -> torch.Tensor:
    """Every half-step's normalised matrix P_k (k = 1..2T, probabilities, not logs; even k after a
    row step) in one (2T, n, n, B) buffer, each written by the half-step itself: a fresh tensor per
    half-step costs an allocation and its page faults on CPU, more than the arithmetic does."""
    states = Lt.new_empty((2 * n_iters, *Lt.shape))
    if log_domain:
        X = _first_row_step(Lt, True)
        torch.exp(X, out=states[0])
        for k in range(1, 2 * n_iters):
            X = _half_step(X, _ROW if k % 2 == 0 else _COL, True, inplace=True)
            torch.exp(X, out=states[k])
        return states
    P = torch.sub(Lt, Lt.amax(_ROW, keepdim=True), out=states[0]).exp_()
    P.div_(P.sum(_ROW, keepdim=True))
    for k in range(1, 2 * n_iters):
        prev = states[k - 1]
        torch.div(prev, prev.sum(_ROW if k % 2 == 0 else _COL, keepdim=True), out=states[k])
    return states


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


def _reverse(states: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
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


class _SinkhornFunction(torch.autograd.Function):
    """Sinkhorn with an exact backward: the adjoint of every half-step, on iterates the forward kept
    (small batches) or recomputes from the stored logits."""

    @staticmethod
    def forward(ctx, logits, iters, tol, max_iters):
        acc = compute_dtype(logits.dtype)
        Lt = _to_batch_last(logits.detach(), acc)
        states = None
        compiled = tol is None and _compiling()
        if not compiled:  # one host sync: raise on inf/NaN, pick the domain (and float64 on overflow)
            Lt, acc, log_domain = _eager_domain(logits, Lt, acc)
        if compiled:
            # No host sync under torch.compile: both domains, the same batch-wide choice as eager
            # (a 0-dim bool tensor), selected on the device; non-finite logits cannot raise here,
            # so their matrices come back all NaN, as from the Triton kernel.
            log_domain = _spread_tensor(Lt) > _EXP_DOMAIN_MAX_SPREAD
            Pt = torch.where(log_domain, _iterates(Lt, iters, True, keep=False)[0],
                             _iterates(Lt, iters, False, keep=False)[0])
            Pt = torch.where(torch.isfinite(Lt).all(_ROW).all(_COL), Pt, torch.nan)
            n_iters = iters
        elif tol is None:
            keep = ctx.needs_input_grad[0] and 2 * iters * Lt.numel() * Lt.element_size() <= _KEEP_STATES_BYTES
            Pt, states = _iterates(Lt, iters, log_domain, keep=keep)
            n_iters = iters
        else:
            Pt, n_iters = _run_to_tol(Lt, float(tol), max_iters, log_domain)
        if states is None:
            ctx.save_for_backward(logits)
        else:  # the iterates themselves: the backward only runs the adjoint
            ctx.save_for_backward(logits, states)
        ctx.n_iters = n_iters
        ctx.log_domain = log_domain
        ctx.acc = acc
        err = _result_error(Pt, logits.dtype).to(compute_dtype(logits.dtype))
        ctx.mark_non_differentiable(err)
        # tolerance mode has synchronised every iteration: the iterate's own error (a float) tells
        # non-convergence from rounding of a half-precision result
        iterate_err = None if tol is None or Pt.dtype == logits.dtype else float(_marginal_error(Pt))
        return _from_batch_last(Pt, logits.shape, logits.dtype), err, iterate_err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_P, grad_err, grad_iterate_err):
        logits, *kept = ctx.saved_tensors
        if grad_P is None:
            return None, None, None, None
        acc = ctx.acc
        n = logits.size(-1)
        dPt = _to_batch_last(grad_P, acc)
        if kept:
            states = kept[0]
            return _from_batch_last(_reverse(states, dPt * states[-1]), logits.shape, logits.dtype), None, None, None
        Lt = _to_batch_last(logits, acc)
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
    the unrolled iteration (not the implicit fixed-point gradient): it runs the adjoint of every
    half-step, on iterates kept by the forward when they take ≤ 32 MiB, else recomputed from the
    stored logits. With ``return_error`` returns
    (P, err), err = max over the batch of |row sum − 1| and |column sum − 1| of P as returned
    (fp32/fp64 0-dim): for bf16/fp16 logits that includes P's rounding (up to eps/2 of the dtype,
    3.9e-3 / 4.9e-4), so such a result cannot meet a smaller tol and tolerance mode says so.
    Non-finite logits raise ValueError in eager mode (one host sync; skipped under torch.compile).
    Finite float32/bf16/fp16 logits whose row spread overflows float32 (|max − min| > 3.4e38, e.g.
    ±3e38) are iterated in float64 in eager mode (float32 gave NaN there); under torch.compile,
    as on the Triton kernel, such a matrix may come back NaN.
    Its arguments are validated by ``modula_mhc.kernels.sinkhorn``, the public entry point.
    """
    if logits.size(-1) == 0:  # else an obscure reshape error deep inside
        raise ValueError(f"sinkhorn: expected n×n matrices with n >= 1, got shape {tuple(logits.shape)}")
    P, err, iterate_err = _SinkhornFunction.apply(logits, iters, tol, max_iters)
    if tol is not None and nonconvergence != "ignore":
        _report_tolerance(float(err), iterate_err, tol, max_iters, logits.dtype, nonconvergence)
    return (P, err) if return_error else P


def _report_tolerance(reached: float, iterate_err: float | None, tol: float, max_iters: int,
                      dtype: torch.dtype, nonconvergence: str) -> None:
    """Warn or raise when the returned matrix misses ``tol``, naming why: the iteration hit the cap,
    or (bf16/fp16 logits) it converged but rounding the result to ``dtype`` costs more than tol."""
    if reached < tol:
        return
    if iterate_err is not None and iterate_err < tol:
        name = str(dtype).replace("torch.", "")
        msg = (f"sinkhorn: the iteration converged, but rounding the result to {name} leaves marginal error "
               f"{reached:.3g} >= tol={tol:g}; a {name} result carries up to {torch.finfo(dtype).eps / 2:.2g} "
               "of rounding per row sum: use a larger tol or float32 logits")
    else:
        msg = (f"sinkhorn: tolerance mode stopped at max_iters={max_iters} with marginal error "
               f"{reached:.3g} >= tol={tol:g} (logits too spread for this cap); raise max_iters, "
               "or pass return_error=True and check the error")
    if nonconvergence == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg, SinkhornConvergenceWarning, stacklevel=4)
