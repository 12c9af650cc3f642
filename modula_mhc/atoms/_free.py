"""Base classes for atoms whose weight has its own natural norm and no manifold constraint.

Such an atom steps by plain subtraction (W ← W − lr·A) and its retraction is the identity; the
two norms used by several atoms live here once:

* ``MaxAbsAtom``: ‖w‖_∞ (the RMS→RMS operator norm of diag(w)); dual t·sign(G), except that
  entries below 1e-6 of max|G| get 0: their sign is rounding noise (summation order), not a
  direction, and a full-size step along noise made data-parallel runs diverge. Init 1.
* ``RMSAtom``: ‖w‖_RMS; dual t·G/‖G‖_RMS (0 for a zero gradient). Init 0.
"""
from __future__ import annotations

import torch

from ..module import Atom


def _rms_normalised(G, dim=None):
    """G/‖G‖_RMS over ``dim`` (all entries if None), 0 where G is 0. G is first divided by its
    max |entry| so that squaring neither underflows (|G| < ~1e-19) nor overflows (|G| > ~1e19) in
    float32: the direction does not depend on the gradient's scale, from 1e-30 to 1e30."""
    Gf = G.to(torch.promote_types(G.dtype, torch.float32))
    dims = () if dim is None else (dim,)
    peak = Gf.abs().amax(dim=dims, keepdim=True).clamp_min(torch.finfo(Gf.dtype).tiny)
    Gs = Gf / peak
    rms = Gs.pow(2).mean(dim=dims, keepdim=True).sqrt()
    return torch.where(rms > 0, Gs / rms.clamp_min(1e-30), torch.zeros_like(Gs)).to(G.dtype)


def rms_dual(G, target):
    """t·G/‖G‖_RMS, and 0 (not NaN) for a zero G, at any gradient scale."""
    return _rms_normalised(G) * target


def row_rms_dual(G, target):
    """Every row (last dim) of G scaled to RMS t; zero rows stay zero (the dual of max-row-RMS)."""
    return _rms_normalised(G, dim=-1) * target


class FreeAtom(Atom):
    """An atom without a manifold constraint: ``step_weight`` subtracts, ``retract_`` does nothing."""

    allowed_manifolds = {"euclidean"}
    #: value the weight starts at (None: the subclass's own ``reset_parameters``)
    init_value = None

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        if self.weight is not None and self.init_value is not None:
            self.weight.fill_(self.init_value)
            self._tag()

    @torch.no_grad()
    def step_weight(self, A, lr):
        self.weight.add_(A, alpha=-lr)

    @torch.no_grad()
    def retract_(self):
        pass


class MaxAbsAtom(FreeAtom):
    """Natural norm ‖w‖_∞, dual t·sign(G), init 1."""

    init_value = 1.0

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return W.float().abs().max()

    #: entries with |G| ≤ noise_floor·max|G| are treated as 0 (loses ≤ numel·1e-6 of ⟨G, A⟩)
    noise_floor = 1e-6

    def dualize_weight(self, G, target=1.0, state=None):
        mag = G.abs()
        keep = mag > self.noise_floor * mag.max()
        return torch.where(keep, torch.sign(G), torch.zeros_like(G)) * target


class RMSAtom(FreeAtom):
    """Natural norm ‖w‖_RMS, dual t·G/‖G‖_RMS, init 0."""

    init_value = 0.0

    def weight_norm(self, W=None):
        W = self.weight if W is None else W
        return W.float().pow(2).mean().sqrt()

    def dualize_weight(self, G, target=1.0, state=None):
        return rms_dual(G, target)
