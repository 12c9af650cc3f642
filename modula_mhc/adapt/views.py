"""Atom views: a modula_mhc ``Atom`` that borrows a parameter owned by someone else's module.

A view registers no parameter of its own: ``view.weight`` is ``getattr(owner, name)``, the model's
own tensor, so the model's ``state_dict``, ``load_state_dict`` and ``save_pretrained`` see nothing
new. The view tags that parameter with ``_mm_atom`` (as native atoms tag theirs), so
:class:`~modula_mhc.optim.DualizeRetract` finds it, and it implements the atom protocol the
optimizer calls: ``weight``, ``manifold``, ``weight_norm``, ``dualize_weight``, ``step_weight``,
``retract_`` and ``diagnostics``.

Natural norms (the model's forward pass is untouched, so the RMS→RMS gain that a native
``atoms.Linear`` applies in its forward pass lives in the view instead):

* ``MatrixView`` — a weight read as one or more (rows, fan_in) matrices M (Linear (out, in);
  Hugging Face ``Conv1D`` (in, out), transposed; Conv1d/Conv2d (out, in·k…)), each with gain
  s = √(rows/fan_in): ‖M‖ = ‖M‖₂/s (the RMS→RMS operator norm of the map, as for native Linear).
  The manifold holds M/s (unit spectral scale, as native Linear weights); a fused QKV weight is
  split into its projections (``segments``) and, optionally, heads: the norm is the max over the
  pieces and each piece is dualized and stepped on its own.
* ``EmbedView`` — nn.Embedding (vocab, width): max over tokens of the row RMS (native ``Embed``).
* ``GainView`` — a norm layer's gain: ‖g‖_∞, dual t·sign(G) (native ``Gain``).
* ``VectorView`` — biases and every other parameter: ‖w‖_RMS, dual t·G/‖G‖_RMS (native ``Bias``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..atom_tag import AtomTag
from ..atoms._free import FreeAtom, MaxAbsAtom, rms_dual, row_rms_dual
from ..module import Atom, Sharpness

__all__ = ["AtomView", "EmbedView", "GainView", "MatrixView", "VectorView"]


class AtomView(Atom):
    """Base of the views: an Atom over ``getattr(owner, param_name)`` (no parameter registered).

    ``name``: the parameter's name in the adapted model; ``role``: what adapt inferred
    (embed, attn_q/k/v/o/qkv, mlp_in/out, head, norm_gain, bias, conv, matrix, vector);
    ``structure``: "recovered" or "defaulted" (set by adapt)."""

    allowed_manifolds = frozenset({"euclidean"})
    preserves_dim = False

    def __init__(self, owner: nn.Module, param_name: str, name: str, role: str, manifold="euclidean", mass=1.0):
        nn.Module.__init__(self)  # not Atom.__init__: the weight exists already and is not ours
        object.__setattr__(self, "_owner", owner)  # a plain reference: not a submodule of the view
        self.param_name, self.name, self.role = param_name, name, role
        self._mass = mass
        self.shape = tuple(self.weight.shape)
        self.symbolic = False
        self.structure = "defaulted"
        self.note = ""
        self.in_dim = self.out_dim = None
        self.manifold = self._check_manifold(manifold)
        self._tag()

    # -- the borrowed parameter
    @property
    def weight(self):
        return getattr(self._owner, self.param_name)

    def _tag(self):
        self.weight._mm_atom = AtomTag(self)

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """Views never re-initialise the model's weights (the model's own init stands)."""

    def forward(self, x):
        raise RuntimeError(f"{type(self).__name__} for {self.name!r} is a view for the optimizer; "
                           "run the adapted model instead")

    def extra_repr(self):
        return f"{self.name}, shape={self.shape}, role={self.role}, manifold={self.manifold.name}, mass={self._mass}"


class MatrixView(AtomView):
    """MatrixView(owner, param_name, name, role, layout="oi", segments=None, head_dim=None, manifold=...).

    ``layout``: "oi" (torch Linear/Conv: rows are outputs, the rest flattened is fan-in) or "io"
    (Hugging Face Conv1D (in, out) and ConvTranspose (in, out/groups, k…): read transposed).
    ``segments``: row counts of the fused projections along the output dimension (e.g. (C, C, C)
    for GPT-2's c_attn); ``head_dim``: also split every segment into heads of that many rows.
    ``groups``: a grouped convolution is block-diagonal, so it is read as ``groups`` matrices of
    rows/groups rows each (the norm is the largest block's: for unit-norm blocks the whole map has
    RMS→RMS gain 1, so its sensitivity stays 1, unlike fused projections)."""

    allowed_manifolds = None  # type: ignore[assignment]  # any manifold: None means "no restriction"

    def __init__(self, owner, param_name, name, role, layout="oi", segments=None, head_dim=None,
                 manifold="euclidean", mass=1.0, groups=1):
        if layout not in ("oi", "io"):
            raise ValueError(f"MatrixView: layout must be 'oi' or 'io', got {layout!r}")
        self.layout = layout
        W = getattr(owner, param_name)
        if W.ndim < 2:
            raise ValueError(f"MatrixView: {name} has shape {tuple(W.shape)}; a matrix view needs >= 2 dims")
        lead = W.shape[0]  # outputs ("oi") or inputs ("io") of all groups together
        if not (isinstance(groups, int) and groups >= 1 and lead % groups == 0):
            raise ValueError(f"MatrixView: groups must be a positive int dividing {lead} for {name}, got {groups!r}")
        if groups > 1 and segments:
            raise ValueError(f"MatrixView: {name} cannot have both segments and groups")
        self.groups = groups
        rows = groups * W.shape[1] if layout == "io" else W.shape[0]
        fan_in = W.numel() // rows  # per block: in/groups·k… inputs
        segments = tuple(int(s) for s in segments) if segments else (rows,)
        if sum(segments) != rows or any(s < 1 for s in segments):
            raise ValueError(f"MatrixView: segments {segments} do not add up to the {rows} output rows of {name}")
        pieces = [rows // groups] * groups if groups > 1 else []
        for s in segments if groups == 1 else ():
            if head_dim and s % head_dim == 0 and s > head_dim:
                pieces += [head_dim] * (s // head_dim)
            else:
                pieces.append(s)
        self.segments, self.pieces, self.head_dim = segments, tuple(pieces), head_dim
        self.rows, self.fan_in = rows, fan_in
        self.gains = [math.sqrt(p / fan_in) for p in pieces]
        self._uniform = len(set(pieces)) == 1
        super().__init__(owner, param_name, name, role, manifold=manifold, mass=mass)
        self.fan_out = rows

    # -- (rows, fan_in) matrix <-> stored layout
    def _matrix(self, W):
        if self.layout == "oi":
            return W.reshape(W.shape[0], -1)
        # (in, out/g, k…) → g blocks (out/g, in/g·k…) stacked: block j maps group j's inputs
        g = self.groups
        return W.reshape(g, W.shape[0] // g, W.shape[1], -1).transpose(1, 2).reshape(self.rows, -1)

    def _unmatrix(self, M, like):
        if self.layout == "oi":
            return M.reshape(like.shape)
        g = self.groups
        return M.reshape(g, like.shape[1], like.shape[0] // g, -1).transpose(1, 2).reshape(like.shape)

    def _split(self, M):
        """Unit-scale pieces: a (k, p, fan_in) batch when all pieces have p rows, else a list."""
        if self._uniform:
            return M.reshape(len(self.pieces), self.pieces[0], M.shape[-1]) / self.gains[0]
        return [P / g for P, g in zip(torch.split(M, self.pieces, dim=0), self.gains)]

    def _join(self, parts, scale=True):
        if self._uniform:
            out = parts * self.gains[0] if scale else parts
            return out.reshape(self.rows, -1)
        return torch.cat([P * g if scale else P for P, g in zip(parts, self.gains)], dim=0)

    def _pieces_of(self, M, unit=True):
        """Pieces as a list of matrices (unit scale when ``unit``)."""
        parts = self._split(M)
        parts = list(parts.unbind(0)) if self._uniform else parts
        return parts if unit else [P * g for P, g in zip(parts, self.gains)]

    # -- module constants: a fused weight of k projections is the tuple (P_1, …, P_k) of k atoms
    @property
    def sensitivity(self):
        return float(len(self.segments))

    def _coefficient_map(self):
        """As ``Parallel`` of k atoms of mass μ/k each: coefficient k (1 for an ordinary matrix)."""
        return {} if float(self._mass) == 0 else {self: float(len(self.segments))}

    # -- the atom protocol
    def weight_norm(self, W=None):
        M = self._matrix(self.weight if W is None else W)
        return torch.stack([self.manifold.norm(P).float().reshape(()) for P in self._pieces_of(M)]).max()

    def dualize_weight(self, G, target=1.0, state=None):
        Mw, Mg = self._matrix(self.weight), self._matrix(G)
        # dualize sees the gradient with respect to the unit-scale piece: G_unit = s·G_piece
        if self._uniform and len(self.pieces) > 1 and self.manifold.name == "euclidean":
            A = self.manifold._dualize(self._split(Mw), self._split(Mg) * self.gains[0] ** 2, state)
            return self._unmatrix(self._join(A) * target, G)
        parts_w, parts_g = self._pieces_of(Mw), self._pieces_of(Mg)
        sub = self._substates(state)
        out = [self.manifold._dualize(w, g * gain * gain, st) for w, g, gain, st in zip(parts_w, parts_g, self.gains, sub)]
        if state is not None and sub[0] is not None:
            for k in ("iterations", "tangent_residual"):
                vals = [s[k] for s in sub if k in s]
                if vals:
                    state[k] = max(vals)
        A = torch.cat([a * gain for a, gain in zip(out, self.gains)], dim=0)
        return self._unmatrix(A * target, G)

    def _substates(self, state):
        if state is None:
            return [None] * len(self.pieces)
        if len(self.pieces) == 1:
            return [state]
        subs = state.setdefault("pieces", [{} for _ in self.pieces])
        return subs

    @torch.no_grad()
    def step_weight(self, A, lr):
        W = self.weight
        if self.manifold.name == "euclidean":  # no gains to undo: the manifold's own in-place step
            self.manifold._step_(W, A, lr)
            return
        Mw, Ma = self._matrix(W), self._matrix(A)
        new = [self.manifold._step(w, a / gain, lr) * gain
               for w, a, gain in zip(self._pieces_of(Mw), self._pieces_of(Ma), self.gains)]
        W.copy_(self._unmatrix(torch.cat(new, dim=0), W))

    @torch.no_grad()
    def retract_(self):
        W = self.weight
        if self.manifold.name == "euclidean":
            return
        M = self._matrix(W)
        new = [self.manifold._retract(w) * gain for w, gain in zip(self._pieces_of(M), self.gains)]
        W.copy_(self._unmatrix(torch.cat(new, dim=0), W))

    @torch.no_grad()
    def project_(self):
        """Put the weight on its manifold once, exactly: the model's own init can be ill-conditioned
        (a square Gaussian matrix has singular values near 0), where the iterative polar factor of
        ``retract`` has not converged. Stiefel: the SVD polar factor U Vᵀ; DGram: U Vᵀ times the
        column norms (rows for wide pieces); other manifolds: their ``retract``."""
        W = self.weight
        name = self.manifold.name
        if name == "euclidean":
            return
        new = []
        for P, gain in zip(self._pieces_of(self._matrix(W).float()), self.gains):
            if name in ("stiefel", "dgram"):
                U, _, Vh = torch.linalg.svd(P.double(), full_matrices=False)
                Q = U @ Vh
                if name == "dgram":
                    wide = P.shape[-2] < P.shape[-1]
                    norms = torch.linalg.vector_norm(P.double(), dim=-1 if wide else -2)
                    Q = Q * norms.unsqueeze(-1) if wide else Q * norms
                    cap = getattr(self.manifold, "max_scale", None)
                    if cap is not None:
                        Q = self.manifold._retract(Q)
                new.append(Q.to(P.dtype) * gain)
            else:
                new.append(self.manifold._retract(P) * gain)
        W.copy_(self._unmatrix(torch.cat(new, dim=0), W).to(W.dtype))

    def check_start(self, manifold):
        """ValueError (naming the parameter) when the weight cannot start on ``manifold``: DGram
        fixes every column norm (row norm of a wide piece), so a zero one (a zero-initialised
        output projection) stays zero for ever and makes WᵀW singular; the first dual solve would
        fail inside the optimizer, far from the cause."""
        if manifold.name != "dgram":
            return
        for P in self._pieces_of(self._matrix(self.weight.detach()).float()):
            norms = torch.linalg.vector_norm(P, dim=-1 if P.shape[-2] < P.shape[-1] else -2)
            self._check_dgram_norms(norms, P)

    def _check_dgram_norms(self, norms, P):
        if bool((norms.square() == 0).any()):
            which = "row" if P.shape[-2] < P.shape[-1] else "column"
            raise ValueError(f"adapt: {self.name} ({self.role}, shape {self.shape}) has a zero {which}; DGram keeps "
                             f"{which} norms, so it could never move and the dual solve is singular. Initialise it "
                             f"non-zero, or give it another manifold, e.g. adapt(model, {{{self.name!r}: 'stiefel', "
                             "...}}) or the 'muon' preset")

    def diagnostics(self):
        M = self._matrix(self.weight.detach())
        out = {}
        for P in self._pieces_of(M):
            for k, v in self.manifold.diagnostics(P).items():
                if isinstance(v, float):
                    out[k] = max(out.get(k, v), v)
        return out


class _FreeView(AtomView):
    """A view without a manifold constraint: the step and retraction of native free atoms."""

    step_weight = FreeAtom.step_weight
    retract_ = FreeAtom.retract_


class EmbedView(_FreeView):
    """nn.Embedding weight (vocab, width): norm max_token RMS(row), dual rows at RMS t (native Embed)."""

    @staticmethod
    def _row_rms(W):
        return W.float().pow(2).mean(dim=-1, keepdim=True).sqrt()

    def weight_norm(self, W=None):
        return self._row_rms(self.weight if W is None else W).max()

    def dualize_weight(self, G, target=1.0, state=None):
        return row_rms_dual(G, target)  # scale-free: no zero update for 1e-30 or 1e30 gradients

    def diagnostics(self):
        return {"max_row_rms": float(self.weight_norm(self.weight.detach()))}


class TiedEmbedView(EmbedView):
    """An embedding whose matrix is also the output head (GPT-2's ``wte`` / ``lm_head``).

    Used as a head, a (vocab, width) matrix needs the head's RMS→RMS norm √(width/vocab)·‖W‖₂: the
    embedding norm (max row RMS) does not bound how far the logits move, which grows with the
    width. The natural norm here is the max of the two; its dual is the head's (Muon) direction at
    target t, scaled down if a row would move by more than RMS t (only when √vocab > width)."""

    def _head_gain(self, W):
        return math.sqrt(W.shape[0] / W.shape[1])

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        head = torch.linalg.matrix_norm(W.float(), 2) / self._head_gain(W)
        return torch.maximum(self._row_rms(W).max(), head)

    def dualize_weight(self, G, target=1.0, state=None):
        A = self.manifold._dualize(self.weight, G, state) * (self._head_gain(G) * target)
        rows = self._row_rms(A).max()
        if target > 0 and rows > target:
            A = A * (target / rows)
        return A.to(G.dtype)

    def diagnostics(self):
        W = self.weight.detach()
        return {"max_row_rms": float(self._row_rms(W).max()),
                "head_norm": float(torch.linalg.matrix_norm(W.float(), 2) / self._head_gain(W))}


class GainView(_FreeView):
    """A norm layer's gain: ‖g‖_∞, dual t·sign(G) with the noise floor of native ``Gain``."""

    noise_floor = MaxAbsAtom.noise_floor
    weight_norm = MaxAbsAtom.weight_norm
    dualize_weight = MaxAbsAtom.dualize_weight

    @property
    def sharpness(self):
        return Sharpness(0.0, 1.0, 0.0)

    def diagnostics(self):
        return {"max_abs": float(self.weight.detach().abs().max())}


class VectorView(_FreeView):
    """Biases and any other parameter: ‖w‖_RMS, dual t·G/‖G‖_RMS (native ``Bias``), sensitivity 0
    for a bias (it ignores the input's values), 1 otherwise."""

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return W.float().pow(2).mean().sqrt()

    def dualize_weight(self, G, target=1.0, state=None):
        return rms_dual(G, target)

    @property
    def sensitivity(self):
        return 0.0 if self.role == "bias" else 1.0

    @property
    def sharpness(self):
        return Sharpness(0.0, 0.0, 0.0) if self.role == "bias" else Sharpness(0.0, 1.0, 0.0)

    def diagnostics(self):
        return {"rms": float(self.weight_norm(self.weight.detach()))}
