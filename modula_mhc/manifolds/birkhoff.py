"""Birkhoff polytope: doubly-stochastic n×n matrices with positive entries (mHC's residual mixing).

One geometry throughout (docs/manifolds.md, "Birkhoff"):

* natural norm ‖A‖_B = max(max row ℓ1, max column ℓ1) — the ℓ∞→ℓ∞ and ℓ1→ℓ1 operator norms,
  hence also ≥ ‖A‖₂. Every doubly-stochastic W has ‖W‖_B = 1.
* dualize: the steepest direction of the Fisher metric (the metric of the multiplicative step),
  A = W ⊙ (G − α1ᵀ − 1βᵀ) with α, β making the row and column sums of A zero, scaled to ‖A‖_B = 1;
  computed in a spanning tree's cycle coordinates, so it stays exactly tangent next to a vertex.
* step: the matching mirror (exponentiated-gradient) step Sinkhorn(W ⊙ exp(−lr·A ⊘ W)), then the
  move is limited to ‖ΔW‖_B ≤ lr·‖A‖_B along the chord (the polytope is convex) and the result is
  rounded onto the polytope exactly. In float64 internally: entries stay ≥ ``FLOOR``, row and
  column sums are 1 to rounding, at any lr.
"""
from __future__ import annotations

import torch

from ..kernels import sinkhorn
from .base import Manifold, check_shape, check_tensor, containment_tol, unit_max_scale

#: marginal tolerance of the Sinkhorn projections used by retract/step (computed in float64)
SINKHORN_TOL = 1e-12
#: Sinkhorn iteration cap inside retract/step; the exact rounding afterwards makes the result
#: doubly stochastic whether or not the cap was reached
SINKHORN_MAX_ITERS = 200
#: smallest entry the step keeps (log W stays finite; the marginals move by at most n·FLOOR)
FLOOR = 1e-30
#: largest |lr·A ⊘ W| the multiplicative step applies to one entry in one step (e^±30)
MAX_LOG_STEP = 30.0
#: a gradient whose tangent part is below this fraction of it is rounding noise: direction 0
NOISE_FLOOR = 1e-6


def _check_square(X, what):
    check_tensor(X, what)
    if X.size(-1) != X.size(-2):
        raise ValueError(f"{what}: Birkhoff matrices are square (..., n, n), got shape {tuple(X.shape)}")


def zero_marginals(G: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection onto {A : A1 = 0, 1ᵀA = 0}: G − r1ᵀ/n − 1cᵀ/n + (1ᵀG1)/n²·11ᵀ."""
    n = G.size(-1)
    rows = G.sum(dim=-1, keepdim=True)
    cols = G.sum(dim=-2, keepdim=True)
    total = G.sum(dim=(-2, -1), keepdim=True)
    return G - rows / n - cols / n + total / (n * n)


def operator_norm(A: torch.Tensor) -> torch.Tensor:
    """max(max row ℓ1, max column ℓ1) per matrix, shape (..., 1, 1)."""
    rows = A.abs().sum(dim=-1).amax(dim=-1)
    cols = A.abs().sum(dim=-2).amax(dim=-1)
    return torch.maximum(rows, cols)[..., None, None]


def _max_spanning_tree_parents(W: torch.Tensor) -> torch.Tensor:
    """Prim's maximum spanning tree of the bipartite graph of W > 0 (rows 0…n−1, columns n…2n−1, edge
    weights W_ij), rooted at row 0: each node's parent (the root's is itself), shape (..., 1, 2n).
    Batched; 2n − 1 rounds of a few tensor ops, no host sync."""
    zero = torch.zeros_like(W)  # no edges inside a side (W > 0: 0 never wins)
    adj = torch.cat((torch.cat((zero, W), -1), torch.cat((W.mT, zero), -1)), -2)
    best = adj[..., :1, :]  # the heaviest edge from each node into the tree
    parent = torch.zeros(best.shape, dtype=torch.long, device=W.device)
    tree = torch.zeros_like(best)  # −∞ on tree nodes: added, it takes them out of every comparison
    tree[..., 0] = -torch.inf
    for _ in range(adj.size(-1) - 1):
        v = (best + tree).argmax(-1, keepdim=True)
        tree = tree.scatter(-1, v, -torch.inf)
        w = adj.gather(-2, v.expand_as(best)) + tree  # edges from v to the nodes outside
        parent = torch.where(w > best, v, parent)
        best = torch.maximum(w, best)
    return parent


def _tree_cycles(parent: torch.Tensor) -> torch.Tensor:
    """N[..., u, (i, j)]: the flow on the tree edge (u, parent(u)), oriented row → column, of the cycle
    "edge (i, j) from row i to column j, back through the tree"; shape (..., 2n, n²), 0 for the root.
    With R[v, u] = [u is v or an ancestor of v], the way back is N[u, (i, j)] = ±(R[n+j, u] − R[i, u])."""
    m = parent.size(-1)
    n = m // 2
    eye = torch.eye(m, dtype=torch.float64, device=parent.device)
    R = eye + eye[parent[..., 0, :]]  # self and parent; squaring ⌈log₂ m⌉ times reaches every ancestor
    for _ in range(max(1, (m - 1).bit_length())):
        R = (R @ R).clamp_max_(1.0)
    R[..., n:].neg_()  # an edge from a column node up to its parent row runs column → row
    Rt = R.mT
    return (Rt[..., :, None, n:] - Rt[..., :, :n, None]).flatten(-2)


def fisher_projection(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The Fisher-metric tangent projection A = W ⊙ (G − α1ᵀ − 1βᵀ) at W > 0 (Douik & Hassibi 2018): the
    A with A1 = 0, 1ᵀA = 0 minimising Σ (A_ij − W_ij G_ij)² / W_ij. W and G in float64.

    Solved in the cycle coordinates of a maximum spanning tree T of W's bipartite graph: z = A off T,
    A on T = N z, the tree flow that balances z (so A is tangent by construction, to rounding). With
    D = diag(W off T), z = D^½ y, (I + QᵀQ) y = b := D^½ (G_off + Nᵀ G_T), Q = W_T^−½ N D^½, solved
    as y = b − Qᵀ (I + QQᵀ)⁻¹ Q b (2n × 2n). W_T on the cycle of an off-tree edge is ≥ its weight,
    so |Q| ≤ 1 and cond ≤ 1 + 2n³ however small W's entries: near a permutation (entries ~δ) the α, β
    system of the pseudo-inverse it replaces has eigenvalues ~δ, and A lost tangency from δ ≈ 1e-6 down."""
    N = _tree_cycles(_max_spanning_tree_parents(W))  # (..., 2n, n²)
    # the way back from column j to row i is one edge, −1 on it, iff (i, j) ∈ T
    T = ((N == -1.0) & ((N != 0).sum(-2, keepdim=True) == 1)).to(W.dtype)  # T[u]: where u's edge is
    WG = torch.stack((W.flatten(-2), G.flatten(-2)), dim=-1)  # (..., n², 2)
    on_tree = T @ WG
    d = (WG[..., :1] * (1.0 - T.sum(-2).unsqueeze(-1))).sqrt_()  # √W off the tree, 0 on it
    Q = N * d.mT * on_tree[..., :1].clamp_min(FLOOR).rsqrt()  # (the root's row of N is 0)
    b = d * (WG[..., 1:] + N.mT @ on_tree[..., 1:])
    S = torch.eye(Q.size(-2), dtype=W.dtype, device=W.device) + Q @ Q.mT
    z = d * (b - Q.mT @ torch.cholesky_solve(Q @ b, torch.linalg.cholesky_ex(S)[0]))
    return (z + T.mT @ (N @ z)).view_as(W)


def round_to_polytope(F: torch.Tensor) -> torch.Tensor:
    """An exactly doubly-stochastic matrix near a non-negative F (Altschuler, Weed & Rigollet 2017,
    Alg. 2): scale rows, then columns, down to sums ≤ 1, then add err_r·err_cᵀ/‖err_r‖₁ (≥ 0).
    Moves F by at most 2× its ℓ1 marginal error; entries stay ≥ 0 (> 0 where F > 0)."""
    F = F * (1.0 / F.sum(-1, keepdim=True).clamp_min(1.0))
    F = F * (1.0 / F.sum(-2, keepdim=True).clamp_min(1.0))
    err_r = (1.0 - F.sum(-1, keepdim=True)).clamp_min(0.0)
    err_c = (1.0 - F.sum(-2, keepdim=True)).clamp_min(0.0)
    mass = err_r.sum(-2, keepdim=True)
    return F + torch.where(mass > 0, err_r * err_c / mass.clamp_min(1e-300), torch.zeros_like(F))


def _project(logits: torch.Tensor) -> torch.Tensor:
    """Sinkhorn(exp(logits)) in float64 to SINKHORN_TOL (at most SINKHORN_MAX_ITERS), then rounded."""
    P = sinkhorn(logits, tol=SINKHORN_TOL, max_iters=SINKHORN_MAX_ITERS, nonconvergence="ignore")
    return round_to_polytope(P)


def _scale(logits: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """``iters`` Sinkhorn–Knopp iterations on exp(logits) as scaling vectors (float64, no host sync;
    logits within ~700 of their max, as the step's are), not rounded. The step's matrices are within e^±(2·MAX_LOG_STEP) of a doubly-stochastic one and, for
    small lr, off the polytope by O(lr²) only, so a few iterations suffice."""
    K = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    Kt = K.mT
    u = K.sum(-1, keepdim=True).reciprocal_()
    for _ in range(iters):
        v = (Kt @ u).reciprocal_()
        u = (K @ v).reciprocal_()
    v = (Kt @ u).reciprocal_()  # columns last: column sums exact before rounding
    return u * K * v.mT


class Birkhoff(Manifold):
    """Doubly-stochastic matrices (rows and columns sum to 1, entries > 0), batched over leading dims.

    Tangent space: {A : A1 = 0, 1ᵀA = 0}. Natural norm ‖A‖_B = max(max row ℓ1, max column ℓ1):
    the ℓ∞→ℓ∞ operator norm (the one mixing acts with on streams measured by their max), the ℓ1→ℓ1
    norm, and ≥ ‖A‖₂ = the RMS→RMS norm (‖A‖₂² ≤ ‖A‖₁‖A‖_∞), so it serves both the Mix atom and a
    Linear on this manifold. Every doubly-stochastic matrix has norm exactly 1.

    dualize(W, G): the Fisher-metric steepest tangent direction A = W ⊙ (G − α1ᵀ − 1βᵀ), scaled to
    ‖A‖_B = 1 — an ascent direction (⟨G, A⟩ = Σ W_ij Y_ij² / ‖·‖ > 0), not the exact maximiser over
    the ‖·‖_B ball (a linear program). 0 when the tangent part of G is below 1e-6 of G (noise).
    step(W, A, lr): Sinkhorn(W ⊙ exp(−lr·A ⊘ W)) — the mirror step of that metric, so A ⊘ W is
    bounded for A from dualize — with |lr·A ⊘ W| capped at 30 per entry, then the move is shortened
    along the chord to ‖ΔW‖_B ≤ lr·‖A‖_B and rounded exactly onto the polytope. Equal to W − lr·A to
    first order; on the polytope (row and column sums 1 to float rounding) and > 0 at any lr.
    retract(Y): Sinkhorn–Knopp projection of Y (entries ≤ 0 first raised to 1e-12·max|Y|), rounded.
    All of it runs in float64 (n×n matrices are small) and returns the input dtype.
    """

    name = "birkhoff"

    def check_input(self, X, what):
        _check_square(X, what)

    def dualize(self, W, G, state=None):
        Gd = G.detach().to(torch.float64)
        Gu = Gd / Gd.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)  # scale-free (1e±30 grads)
        Wd = W.detach().to(torch.float64).clamp_min(FLOOR)
        T = zero_marginals(Gu)  # the tangent part (Frobenius): below NOISE_FLOOR of G it is rounding
        has_tangent = (T * T).sum(dim=(-2, -1), keepdim=True) > NOISE_FLOOR ** 2 * (Gu * Gu).sum(dim=(-2, -1), keepdim=True)
        A = fisher_projection(Wd, Gu)
        an = operator_norm(A)
        A = torch.where(has_tangent & (an > 0), A / an.clamp_min(1e-300), torch.zeros_like(A))
        if state is not None:
            state["iterations"] = 0
            state["tangent_residual"] = float(torch.maximum(A.sum(dim=-1).abs().amax(), A.sum(dim=-2).abs().amax())) \
                if A.numel() else 0.0
        return A.to(G.dtype)

    def retract(self, Y):
        Yu, amax = unit_max_scale(Y.detach().to(torch.float64))
        if bool((amax == 0).any()):
            raise ValueError("Birkhoff.retract: the zero matrix has no doubly-stochastic scaling")
        logits = Yu.clamp_min(1e-12).log()
        return _project(logits).to(Y.dtype)

    def step(self, W, A, lr):
        lr = float(lr)
        Wd = W.detach().to(torch.float64)
        Ad = A.detach().to(torch.float64)
        ok = torch.isfinite(Ad).all() & (Wd >= 0).all() & (Wd.sum(-1) > 0).all()  # (False for NaN W)
        if not bool(ok):
            raise ValueError("Birkhoff.step: W must be non-negative with positive row sums (retract it first) "
                             "and W, A finite")
        Wd = Wd.clamp_min(FLOOR)
        # mirror step: log of W ⊙ exp(−lr·A ⊘ W), each entry's factor within e^±MAX_LOG_STEP
        step = (Ad / Wd).mul_(-lr).clamp_(-MAX_LOG_STEP, MAX_LOG_STEP)
        D = round_to_polytope(_scale(Wd.log() + step)) - Wd
        # trust region: at most lr·‖A‖_B in the natural norm, along the chord W → P (inside the polytope)
        budget = lr * operator_norm(Ad)
        moved = operator_norm(D)
        s = (budget / moved.clamp_min(1e-300)).clamp_(max=1.0)
        return round_to_polytope(Wd + s * D).clamp_min_(FLOOR).to(W.dtype)

    def contains(self, W, tol=None):
        _check_square(W, "Birkhoff.contains")
        tol = containment_tol(W, tol)
        Wd = W.to(torch.float64)
        rows_ok = ((Wd.sum(dim=-1) - 1).abs() <= tol).all()
        cols_ok = ((Wd.sum(dim=-2) - 1).abs() <= tol).all()
        return bool(rows_ok & cols_ok & (Wd >= -tol).all() & torch.isfinite(Wd).all())

    def norm(self, A):
        check_tensor(A, "Birkhoff.norm")
        Au, amax = unit_max_scale(A.to(torch.float64))
        return (operator_norm(Au) * amax).amax().to(torch.float32 if A.dtype != torch.float64 else torch.float64)

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "Birkhoff.random")
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"Birkhoff.random: expected a square shape (..., n, n), got {shape}")
        logits = torch.randn(shape, generator=generator, dtype=torch.float64)
        P = sinkhorn(logits, tol=1e-12, max_iters=10000, nonconvergence="ignore")
        return round_to_polytope(P).to(dtype=dtype, device=device)

    def diagnostics(self, W):
        Wd = W.detach().to(torch.float64)
        err = torch.maximum((Wd.sum(dim=-1) - 1).abs().max(), (Wd.sum(dim=-2) - 1).abs().max())
        return {"marginal_error": float(err), "min_entry": float(Wd.min()),
                "diagonal_mean": float(torch.diagonal(Wd, dim1=-2, dim2=-1).mean())}
