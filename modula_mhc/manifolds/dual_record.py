"""What a Gram-space dual solve (``dual_ascent``) writes into an optimizer's per-parameter state:
diagnostics per batch member, the warm start of the next solve, and their reduction to the
batch's worst member."""
from __future__ import annotations

import torch

from .base import inner


def delivered_score(Gn: torch.Tensor, A: torch.Tensor, answer_dtype: torch.dtype | None) -> torch.Tensor:
    """⟨Ĝ, A⟩ of A as the caller gets it: rounded to ``answer_dtype`` (a bf16 gradient's dualize is
    returned in bf16), then divided by its spectral norm where that rounding took it above 1, so the
    reported gap is that of the returned direction (the float32 one's was up to 2e-3 smaller)."""
    if answer_dtype is None or answer_dtype == A.dtype:
        return inner(Gn, A.to(Gn.dtype))
    rounded = A.to(answer_dtype).to(Gn.dtype)
    top = torch.linalg.eigvalsh(rounded.mT @ rounded)[..., -1].clamp_min(0).sqrt()
    return inner(Gn, rounded) / top.clamp_min(1.0)


def _record(state: dict, dt: torch.dtype, gap: torch.Tensor, gap_tol: float, iters: torch.Tensor,
            warm: bool | torch.Tensor, *,
            step: torch.Tensor, smoothing: torch.Tensor | None, certificate: torch.Tensor,
            residual: torch.Tensor) -> None:
    """Write a solve's diagnostics and warm start into ``state``, one entry per batch member
    (``worst_member`` reduces them). Tensors are stored in the weight's dtype: torch.optim's
    load_state_dict casts state to it, and a resumed run must warm-start exactly as the
    uninterrupted one."""
    state["dual_step"] = step.detach().to(dt)
    if smoothing is not None:  # the smoothing μ reached, for the next warm start
        state["dual_smoothing"] = smoothing.detach().to(dt)
    # the multiplier of the best upper bound: ‖Ĝ + 2ŴΛ‖_* ≥ optimum for the solver's normalised
    # Ĝ (‖Ĝ‖_F = √n) and Ŵ; a certificate anyone can recheck with an SVD, and the next warm start
    state["certificate"] = certificate.detach().to(dt)
    state["iterations"] = iters
    state["duality_gap"] = gap.detach().to(dt)
    state["certified"] = gap <= gap_tol * (1 + 1e-9) + 1e-12
    state["warm_start"] = warm
    state["tangent_residual"] = residual.detach().to(dt)


def worst_member(state: dict) -> None:
    """The per-member diagnostics of ``_record`` reduced to the batch's worst: the largest gap,
    residual and iteration count (an int), certified (warm-started) only if every member is."""
    for key in ("duality_gap", "tangent_residual"):
        if isinstance(state.get(key), torch.Tensor):
            state[key] = state[key].max()
    if isinstance(state.get("iterations"), torch.Tensor):
        state["iterations"] = int(state["iterations"].max())
    for key in ("certified", "warm_start"):
        if isinstance(state.get(key), torch.Tensor):
            state[key] = bool(state[key].all())


def _no_tangent(W: torch.Tensor, state: dict | None, dt: torch.dtype, kept: torch.dtype) -> torch.Tensor:
    """The answer when no member's gradient has a tangent part: A = 0, exactly optimal. The warm
    start of the previous solve is kept for the next."""
    if state is not None:  # per member, as ``_record``
        zero = torch.zeros(W.shape[:-2], dtype=kept, device=W.device)
        state.update(iterations=torch.zeros(W.shape[:-2], dtype=torch.long, device=W.device), duality_gap=zero,
                     certified=torch.ones(W.shape[:-2], dtype=torch.bool, device=W.device), warm_start=False,
                     tangent_residual=zero)
    return torch.zeros_like(W, dtype=dt)


def _store(state: dict, flat: dict, batch: torch.Size, per_member: bool) -> None:
    """Diagnostics of a flattened solve into ``state``: per-member tensors back in the batch's
    shape, then (unless ``per_member``) reduced to the worst member."""
    for key, value in flat.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            flat[key] = value.reshape(batch + value.shape[1:])
    if not per_member:
        worst_member(flat)
    state.update(flat)
