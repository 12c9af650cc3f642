"""Birkhoff polytope: doubly-stochastic n×n matrices with positive entries (mHC's residual mixing).

One geometry throughout (docs/manifolds.md, "Birkhoff"):

* natural norm ‖A‖_B = max(max row ℓ1, max column ℓ1) — the ℓ∞→ℓ∞ and ℓ1→ℓ1 operator norms,
  hence also ≥ ‖A‖₂. Every doubly-stochastic W has ‖W‖_B = 1.
* dualize: the steepest direction of the Fisher metric (the metric of the multiplicative step),
  A = W ⊙ (G − α1ᵀ − 1βᵀ) with α, β making the row and column sums of A zero, scaled to ‖A‖_B = 1;
  computed in a spanning tree's cycle coordinates, so it stays exactly tangent next to a vertex
  (on CPU, where W's entries are not small, by the α, β system itself: well conditioned there, and faster).
* step: the matching mirror (exponentiated-gradient) step Sinkhorn(W ⊙ exp(−lr·A ⊘ W)), then the
  move is limited to ‖ΔW‖_B ≤ lr·‖A‖_B along the chord (the polytope is convex) and the result is
  rounded onto the polytope exactly. In float64 internally: entries stay ≥ ``FLOOR``, row and
  column sums are 1 to rounding, at any lr.
"""
from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=32)
def _constants(B: int, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-shape constants (cached: building them costs as much as a round of the solve): row offsets of
    the (B·2n, 2n) adjacency, node indices, I, the side signs (+1 rows, −1 columns), e₀e₀ᵀ and vvᵀ/2n for
    v = the side signs (the α, β system's null vector). Shared: never written to."""
    m = 2 * n
    side = torch.ones(m, dtype=torch.float64, device=device)
    side[n:] = -1.0
    root = torch.zeros(m, m, dtype=torch.float64, device=device)
    root[0, 0] = 1.0
    eye = torch.eye(m, dtype=torch.float64, device=device)
    return (torch.arange(0, B * m, m, device=device).unsqueeze(-1), torch.arange(m, device=device), eye, side, root,
            side.outer(side) / m)


def _max_spanning_tree(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prim's maximum spanning tree of the bipartite graph of W > 0, shape (B, n, n) (rows 0…n−1, columns
    n…2n−1, edge weights W_ij), rooted at row 0: each node's parent (the root's is itself) and the weight of
    its edge to it (−∞ for the root), both (B, 2n). 2n − 1 rounds of a few small ops, no host sync."""
    B, n, _ = W.shape
    m = 2 * n
    adj = W.new_zeros(B, m, m)  # no edges inside a side (W > 0: 0 never wins)
    adj[:, :n, n:] = W
    adj[:, n:, :n] = W.mT
    rows = adj.view(B * m, m)
    offsets = _constants(B, n, W.device)[0]
    tree = W.new_zeros(B, m)  # −∞ on tree nodes: added, it takes them out of every comparison
    tree[:, 0] = -torch.inf
    key = adj[:, 0] + tree  # the heaviest edge from each node outside into the tree
    order = [torch.zeros_like(offsets)]
    for _ in range(m - 1):
        v = key.argmax(-1, keepdim=True)
        tree.scatter_(-1, v, -torch.inf)
        # v's adjacency row by a flat index_select: cheaper than a gather over an expanded index
        key = torch.maximum(key, rows.index_select(0, (v + offsets).view(-1))).add_(tree)
        order.append(v)
    # a node's parent is its heaviest edge into the nodes added before it: one pass, not a where per round
    rank = torch.cat(order, -1).argsort(-1)
    weight, parent = torch.where(rank.unsqueeze(-2) < rank.unsqueeze(-1), adj, -torch.inf).max(-1)
    return parent, weight


def _ancestors(parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P[v, u] = [u = parent(v)] and R[v, u] = [u is v or an ancestor of v], (B, m, m) in float64:
    R = (I + P) squared ⌈log₂ m⌉ times, clamped to 1 (paths of length ≤ 2^k)."""
    B, m = parent.shape
    _, nodes, eye, *_ = _constants(B, m // 2, parent.device)
    P = (parent.unsqueeze(-1) == nodes).to(torch.float64)
    R = P + eye
    for _ in range(max(1, (m - 1).bit_length())):
        R = (R @ R).clamp_max_(1.0)
    return P, R


def _fisher_tree(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The robust solve, (B, n, n), in the cycle coordinates of a maximum spanning tree T (``fisher_projection``).
    With N the tree flows of all edges' cycles (−e_u on u's own tree edge), Q = W_T^−½ N W^½, S = QQᵀ + e₀e₀ᵀ
    = I + Q_off Q_offᵀ: y = W^½G − Qᵀ S⁻¹ Q W^½G, A = W^½ y off T and N (W^½ y) on T (the tree flow)."""
    B, n, _ = W.shape
    m = 2 * n
    parent, w_tree = _max_spanning_tree(W)
    P, R = _ancestors(parent)
    r_tree = w_tree.clamp_min(FLOOR).rsqrt()  # the root's is finite: its row of N is 0
    side, root = _constants(B, n, W.device)[3:5]  # −1: a column node's edge up to its parent row runs column → row
    K = R.mT * (side * r_tree).unsqueeze(-1)  # K[u, v] = ±[v is u or under u]/√W_T[u]
    sW = W.sqrt()
    # Q[u, (i, j)] = (K[u, n+j] − K[u, i]) √W_ij: ±√(W_ij/W_T[u]) where u's edge is on (i, j)'s cycle, so |Q| ≤ 1
    Q = ((K[..., :, None, n:] - K[..., :, :n, None]) * sW.unsqueeze(-3)).view(B, m, n * n)
    sWG = (sW * G).view(B, n * n, 1)
    S = torch.baddbmm(root, Q, Q.mT)
    phi = torch.cholesky_solve(Q @ sWG, torch.linalg.cholesky_ex(S)[0])
    y = torch.baddbmm(sWG, Q.mT, phi, alpha=-1.0)
    # on T, W_T G_T − √W_T φ cancels to ~δ near a vertex: set it to N (A off T) by adding √W_T (Q y)[u]
    # = √W_T (Q_off y_off − y_T[u]); the sum's rounding is ~ε·|A|, so A stays tangent to its own rounding
    flow = (Q @ y).squeeze(-1) / r_tree  # 0 at the root (its row of Q is 0)
    M = P * flow.unsqueeze(-1)  # M[u, parent(u)] = flow on u's edge, row → column
    return (sW.view(B, n * n, 1) * y).view(B, n, n) + M[:, :n, n:] + M[:, n:, :n].mT


def _fisher_potentials(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The α, β solve for well-conditioned W, (B, n, n): L [α; β] = [(W⊙G)1; (W⊙G)ᵀ1] with L = [[diag W1, W],
    [Wᵀ, diag Wᵀ1]] + vvᵀ/2n (v: its null vector), by Cholesky; row 0 and column 0 then take the rounding imbalance."""
    B, n, _ = W.shape
    WG = W * G
    L = torch.diag_embed(torch.cat((W.sum(-1), W.sum(-2)), -1))
    L[:, :n, n:] = W
    L[:, n:, :n] = W.mT
    L += _constants(B, n, W.device)[5]
    rhs = torch.cat((WG.sum(-1), WG.sum(-2)), -1).unsqueeze(-1)
    ab = torch.cholesky_solve(rhs, torch.linalg.cholesky_ex(L)[0])
    A = WG - W * (ab[:, :n] + ab[:, n:].mT)
    A[:, 1:, 0] -= A[:, 1:].sum(-1)  # rows 1… balanced through column 0, then every column through row 0
    A[:, 0] -= A.sum(-2)
    return A


#: on CPU the α, β solve is used where its condition bound 2·max(row, column sum)/(n·min W) is ≤ this for
#: the whole batch; elsewhere, and on GPU (the test would be a host sync), the tree solve (cond ≤ 1 + 2n³)
FAST_PATH_COND = 100.0


def fisher_projection(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The Fisher-metric tangent projection A = W ⊙ (G − α1ᵀ − 1βᵀ) at W > 0 (Douik & Hassibi 2018): the
    A with A1 = 0, 1ᵀA = 0 minimising Σ (A_ij − W_ij G_ij)² / W_ij. W and G in float64, (..., n, n).

    Robust solve (``_fisher_tree``) in the cycle coordinates of a maximum spanning tree T of W's bipartite
    graph: z = A off T, A on T = N z, the tree flow that balances z (so A is tangent by construction, to
    rounding); a 2n × 2n system (I + QQᵀ) with |Q| ≤ 1 (W_T on the cycle of an off-tree edge is ≥ its
    weight), so cond ≤ 1 + 2n³ however small W's entries: near a permutation (entries ~δ) the α, β system
    has eigenvalues ~δ, and its pseudo-inverse lost tangency from δ ≈ 1e-6 down. On CPU, where every
    entry is ≥ 2/(n·FAST_PATH_COND) of the largest row/column sum, the α, β system is that well conditioned
    and solved directly (``_fisher_potentials``: no spanning tree, ~3× fewer ops)."""
    n = W.size(-1)
    Wb, Gb = W.reshape(-1, n, n), G.reshape(-1, n, n)
    if Wb.numel() == 0:
        return torch.zeros_like(W)
    if W.device.type == "cpu" and not torch.compiler.is_compiling():
        # one host sync, free on CPU: the batch's smallest entry against its largest row/column sum
        mass = torch.maximum(Wb.sum(-1).amax(), Wb.sum(-2).amax())
        if bool(2.0 * mass <= FAST_PATH_COND * n * Wb.amin()):
            return _fisher_potentials(Wb, Gb).view(W.shape)
    return _fisher_tree(Wb, Gb).view(W.shape)


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
        budget = abs(lr) * operator_norm(Ad)  # lr < 0 (ascent) too: a negative s left the polytope
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
