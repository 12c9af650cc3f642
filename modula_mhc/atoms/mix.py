"""Atoms of hyper-connection stream mixing: the Birkhoff ``Mix``, the coefficient ``Gate`` and the
``StaticCoefficients`` (static logits/weights of H_pre, H_post, H_res).

Stream tensors have shape (..., n, C): n residual streams of width C. Their norm is the max over
streams (and tokens) of the RMS over C, so a mixing matrix acts with its ℓ∞→ℓ∞ operator norm
(max absolute row sum) and a row-stochastic non-negative matrix is non-expansive.
Orientation: ``W[i, j]`` is the weight of input stream j in output stream i (out_i = Σ_j W_ij x_j).
"""
from __future__ import annotations

import math

import torch

from ..module import Atom, Sharpness
from ._free import FreeAtom, MaxAbsAtom, rms_dual


def near_identity_doubly_stochastic(n: int, diagonal: float) -> torch.Tensor:
    """d·I + (1 − d)/(n − 1)·(J − I): doubly stochastic with diagonal d (the 1×1 case is [[1]])."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    off = (1.0 - diagonal) / (n - 1)
    return torch.full((n, n), off, dtype=torch.float64) + (diagonal - off) * torch.eye(n, dtype=torch.float64)


class Mix(Atom):
    """Mix(streams, init_diagonal=0.95): out_i = Σ_j W_ij x_j on a stream tensor (..., n, C), with W a
    doubly-stochastic n×n matrix on the Birkhoff manifold (the static H_res of mHC).

    Natural norm: the Birkhoff norm ‖A‖_B = max(max row ℓ1, max column ℓ1) ≥ ‖A‖_{∞→∞}, so
    ‖ΔW x‖ ≤ ‖ΔW‖_Mix‖x‖ in the stream norm (max over streams of the RMS), and every
    doubly-stochastic weight has norm exactly 1 (well-normed). Dualize: the manifold's direction
    (Fisher-metric steepest, scaled to norm t). Step: the manifold's mirror step, which moves W by
    at most lr·t in this norm and keeps it on the polytope. Sensitivity 1 (W ≥ 0 with unit row
    sums), sharpness (0, 1, 0) (bilinear in W and x).
    Init: diagonal ``init_diagonal``, off-diagonal (1 − d)/(n − 1), so the block starts as a
    plain residual with streams mixing only weakly."""

    allowed_manifolds = {"birkhoff"}

    def __init__(self, streams, init_diagonal=0.95, mass=1.0, role="mix"):
        if not isinstance(streams, int) or streams < 1:
            raise ValueError(f"Mix: streams must be a positive int, got {streams!r}")
        if not 0.0 < init_diagonal < 1.0 and streams > 1:
            raise ValueError(f"Mix: init_diagonal must lie in (0, 1) (positive entries), got {init_diagonal}")
        self.streams, self.init_diagonal = streams, float(init_diagonal)
        super().__init__((streams, streams), manifold="birkhoff", mass=mass, role=role)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is None:
            return
        self.weight.copy_(near_identity_doubly_stochastic(self.streams, self.init_diagonal).to(self.weight))
        self._tag()

    def forward(self, x):
        if x.ndim < 2 or x.size(-2) != self.streams:
            raise ValueError(f"Mix({self.streams}) expects a stream tensor (..., {self.streams}, C), "
                             f"got shape {tuple(x.shape)}")
        return self.weight.to(x.dtype) @ x

    def weight_norm(self, W=None):
        return self.manifold.norm(self.weight if W is None else W)

    def dualize_weight(self, G, target=1.0, state=None):
        return target * self.manifold._dualize(self.weight, G, state)
    # sensitivity 1 and sharpness (0, 1, 0) are the Atom defaults: x ↦ W x is bilinear in (W, x);
    # under claims.certify the sensitivity is max(1, ‖W‖_{∞→∞}), the weight gain max(1, stream RMS)


class Gate(MaxAbsAtom):
    """Gate(sizes, scale=0.01): per-group scalar gates α_g = scale·g_g applied to a coefficient
    vector z made of consecutive groups of the given sizes: y_k = α_{group(k)}·z_k.

    The weight g is initialised to 1, so the gates start at ``scale`` (0.01 in mHC). Natural norm
    ‖g‖_∞; dualize t·sign(G). At ‖g‖_∞ ≤ 1 the map z ↦ y has Lipschitz constant ``scale``
    (sensitivity), and sharpness (0, scale, 0) (bilinear in g and z). The weight effect
    scale·‖Δg ⊙ z‖ ≤ scale·‖Δg‖_∞·RMS(z) gives weight gain max(1, scale) at inputs of RMS ≤ 1.
    Under ``claims.certify`` both use the recorded ‖g‖_∞ and input RMS (the Atom rules, times scale)."""

    def __init__(self, sizes, scale=0.01, mass=1.0, role="gate"):
        sizes = tuple(int(s) for s in sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"Gate: group sizes must be positive, got {sizes}")
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"Gate: scale must be a positive number, got {scale!r}")
        self.sizes, self.scale = sizes, float(scale)
        super().__init__((len(sizes),), manifold="euclidean", mass=mass, role=role)
        index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.register_buffer("index", index, persistent=False)
        self.in_dim = self.out_dim = sum(sizes)

    def gates(self) -> torch.Tensor:
        """α per entry of z (length Σ sizes)."""
        return self.scale * self.weight[self.index]

    def forward(self, z):
        if z.size(-1) != self.in_dim:
            raise ValueError(f"Gate expects a last dim of {self.in_dim}, got {tuple(z.shape)}")
        return z * self.gates().to(z.dtype)

    @property
    def sensitivity(self):
        return self.scale * super().sensitivity  # Atom: 1, or max(1, ‖g‖_∞) under claims.certify

    @property
    def weight_gain(self):
        return max(1.0, self.scale * super().weight_gain)  # Atom: 1, or max(1, input RMS) under certify

    @property
    def sharpness(self):
        return Sharpness(0.0, self.scale, 0.0)


def _l1_ball_dual(G: torch.Tensor, dim: int) -> torch.Tensor:
    """argmax ⟨G, A⟩ over ‖A‖₁ ≤ 1 along ``dim``: all mass on the largest |G| (sign kept); 0 for G = 0."""
    idx = G.abs().argmax(dim=dim, keepdim=True)
    A = torch.zeros_like(G)
    A.scatter_(dim, idx, torch.sign(G.gather(dim, idx)))
    return A


class StaticCoefficients(FreeAtom):
    """StaticCoefficients(streams, init, with_res=True, norm="rms"): the static part b of the
    hyper-connection coefficients, laid out as b = (b_pre (n), b_post (n), b_res (n², row-major:
    b_res[i, j] at 2n + i·n + j)). ``forward(x)`` returns b broadcast over x's leading dims (it
    ignores x's values: sensitivity 0). ``init`` is the vector ``reset_parameters`` restores.

    norm="rms" (mHC: b are logits, their effect is bounded by σ and Sinkhorn): ‖b‖_RMS, dualize
    t·G/‖G‖_RMS. norm="mixing" (HC: b are used directly as mixing weights): the max of ‖b_pre‖₁,
    ‖b_post‖_∞ and ‖B_res‖_{∞→∞} (max absolute row sum), each the operator norm of that piece in the
    stream norm; dualize maximises ⟨G, A⟩ on each piece's unit ball, scaled by t."""

    NORMS = ("rms", "mixing")

    def __init__(self, streams, init, with_res=True, norm="rms", mass=1.0, role="hyper_static"):
        if norm not in self.NORMS:
            raise ValueError(f"StaticCoefficients: norm must be one of {self.NORMS}, got {norm!r}")
        self.streams, self.with_res, self.norm_kind = int(streams), bool(with_res), norm
        size = 2 * self.streams + (self.streams ** 2 if with_res else 0)
        init = torch.as_tensor(init, dtype=torch.float64).flatten()
        if init.numel() != size:
            raise ValueError(f"StaticCoefficients: init has {init.numel()} entries, expected {size}")
        if not torch.isfinite(init).all():
            raise ValueError("StaticCoefficients: init must be finite")
        self._init = init
        super().__init__((size,), manifold="euclidean", mass=mass, role=role)
        self.out_dim = size

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is not None:
            self.weight.copy_(self._init.to(self.weight))
            self._tag()

    def forward(self, x):
        return self.weight.expand(*x.shape[:-1], -1)

    def split(self, b=None):
        """(b_pre, b_post, b_res or None) views of b (the weight by default); b_res is (…, n, n)."""
        b = self.weight if b is None else b
        n = self.streams
        res = b[..., 2 * n:].unflatten(-1, (n, n)) if self.with_res else None
        return b[..., :n], b[..., n:2 * n], res

    def weight_norm(self, W=None):
        W = (self.weight if W is None else W).float()
        if self.norm_kind == "rms":
            return W.pow(2).mean().sqrt()
        pre, post, res = self.split(W)
        parts = [pre.abs().sum(), post.abs().max()]
        if res is not None:
            parts.append(res.abs().sum(-1).max())
        return torch.stack(parts).max()

    def dualize_weight(self, G, target=1.0, state=None):
        if self.norm_kind == "rms":
            return rms_dual(G, target)
        pre, post, res = self.split(G)
        parts = [_l1_ball_dual(pre, 0), torch.sign(post)]
        if res is not None:
            parts.append(_l1_ball_dual(res, -1).flatten())
        return torch.cat(parts) * target

    @property
    def sensitivity(self):
        return 0.0

    @property
    def sharpness(self):
        return Sharpness(0.0, 0.0, 0.0)
