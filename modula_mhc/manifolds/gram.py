"""Shared base of the manifolds whose constraint lives on the Gram matrix WᵀW (Stiefel, DGram)."""
from __future__ import annotations

import math

import torch

from .base import (
    Manifold,
    as_tall,
    check_shape,
    check_tensor,
    compute_dtype,
    from_tall,
    is_wide,
    semi_orthogonal,
    spectral_norm,
)
from .dual_ascent import steepest_tangent
from .warm_start import WARM_KEYS

#: default certified relative duality gap: every dualize reaches ≥ 99.2% of the optimum. 5e-3 was
#: the default before: on real 512×128 MLP gradients 7 of 16 warm-started solves hit the cap at gaps
#: up to 7.5e-3 (reported uncertified); at 8e-3 all 16 certify, in 0.79× the time, and the float32
#: answer keeps a margin over the 99% the optimizer promises
GAP_TOL = 8e-3
#: default cap on dual iterations: rank-1-plus-noise gradients (a spike over a 0.3–3% floor) need
#: up to ~700 to certify 8e-3 (DGram 128×64 with column norms spread over 1e4); real training
#: gradients certify within ~200, so the cap only costs time where it buys the certificate
MAX_ITERS = 1000


def _member(combined: dict, j: int, k: int) -> dict:
    """Member j's entries of a stacked solve's per-member ``state`` (k members), with the types a
    single solve writes: ``iterations`` an int, ``certified`` and ``warm_start`` bools, the rest
    tensors. A member without tangent part (0 iterations) keeps its warm start, as alone."""
    out = {}
    for key, value in combined.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == k:
            value = value[j]
            if key == "iterations":
                value = int(value)
            elif key in ("certified", "warm_start"):
                value = bool(value)
        out[key] = value
    if out.get("iterations") == 0:
        for key in WARM_KEYS:
            out.pop(key, None)
    return out


def _warm_signature(state: dict | None) -> tuple:
    """The warm-start entries a member has, with their shapes: members stack only with their like."""
    if state is None:
        return ()
    return tuple((key, tuple(state[key].shape)) for key in WARM_KEYS if isinstance(state.get(key), torch.Tensor))


class GramManifold(Manifold):
    """A matrix manifold {W : P(WᵀW) = P(I)} with the spectral norm; subclasses set ``offdiag``
    (P = Off for DGram, identity for Stiefel) and ``retract``.

    dualize(W, G): argmax ⟨G, A⟩ over tangent A with ‖A‖₂ ≤ 1, solved in the n×n Gram space until
    the certified relative duality gap is ≤ ``gap_tol`` or ``max_iters`` iterations
    (manifolds/dual_ascent.py). Wide matrices are handled through their transpose.
    """

    offdiag = False
    #: same-shape weights share one dual solve in the optimizer, each with its own state (``_dualize_stack``)
    stacks_members = True

    def __init__(self, gap_tol: float = GAP_TOL, max_iters: int = MAX_ITERS):
        if not (isinstance(gap_tol, (int, float)) and 0 < gap_tol < 1 and math.isfinite(gap_tol)):
            raise ValueError(f"{type(self).__name__}: gap_tol must be a number in (0, 1), got {gap_tol!r}")
        if not (isinstance(max_iters, int) and not isinstance(max_iters, bool) and max_iters >= 1):
            raise ValueError(f"{type(self).__name__}: max_iters must be an int >= 1, got {max_iters!r}")
        self.gap_tol, self.max_iters = float(gap_tol), int(max_iters)

    def _settings(self) -> str:
        return f"gap_tol={self.gap_tol}, max_iters={self.max_iters}"

    def __repr__(self):
        return f"{type(self).__name__}({self._settings()})"

    def _normalise(self, Wt: torch.Tensor) -> torch.Tensor:
        """The point handed to the dual solver (DGram rescales it; the constraint set is a cone)."""
        return Wt

    def dualize(self, W, G, state=None):
        return self._solve(W, G, state, per_member=False)

    def _solve(self, W, G, state, per_member):
        dt, wide = compute_dtype(G), is_wide(W)
        Wt, Gt = as_tall(W.to(dt), wide), as_tall(G.to(dt), wide)
        # a bf16 weight keeps bf16 state (resumes are exact); the gap reported is that of A in G's dtype
        A = self._tangent(Wt, Gt, state, per_member, W.dtype, G.dtype)
        return from_tall(A, wide).to(G.dtype)

    def _tangent(self, Wt, Gt, state, per_member, kept, answer):
        """The steepest tangent direction at tall Wt (``dual_ascent.steepest_tangent``)."""
        return steepest_tangent(self._normalise(Wt), Gt, self.offdiag, state, self.gap_tol, self.max_iters,
                                state_dtype=kept, per_member=per_member, answer_dtype=answer)

    def _dualize_stack(self, W, G, states):
        """dualize of a stack (k, m, n) of tall matrices, member j warm-starting from and writing to
        ``states[j]`` (None: nothing kept) as if dualized alone; one solve per set of members with
        the same warm-start entries (all of them but after ``set_manifold`` or a first step), whose
        members each leave it once certified, so the stack does not wait for its slowest member."""
        groups: dict = {}
        for j, st in enumerate(states):  # a member with a warm start must not start cold for its neighbours
            groups.setdefault(_warm_signature(st), []).append(j)
        if len(groups) == 1:
            return self._solve_members(W, G, states)
        A = torch.empty_like(G)
        for idx in groups.values():
            A[idx] = self._solve_members(W[idx], G[idx], [states[j] for j in idx])
        return A

    def _solve_members(self, W, G, states):
        """One stacked solve of members whose states hold the same warm-start entries."""
        combined = {key: torch.stack([st[key] for st in states]) for key, _ in _warm_signature(states[0])}
        A = self._solve(W, G, combined, per_member=True)
        for j, st in enumerate(states):
            if st is not None:
                st.update(_member(combined, j, len(states)))
        return A

    def norm(self, A):
        check_tensor(A, f"{type(self).__name__}.norm")
        return spectral_norm(A).max()

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, f"{type(self).__name__}.random")
        if len(shape) < 2:
            raise ValueError(f"{type(self).__name__}.random: expected a matrix shape (..., out, in), got {shape}")
        return semi_orthogonal(shape, generator, dtype, device)
