"""Sphere {W : ‖W‖_F = 1} with the Frobenius norm (any shape, batched over no dims)."""
from __future__ import annotations

import torch

from .base import (
    Manifold,
    check_shape,
    check_tensor,
    compute_dtype,
    containment_tol,
    unit_max_scale,
)


def _fro_all(X):
    return torch.linalg.vector_norm(X)


class Sphere(Manifold):
    """Unit Frobenius sphere: the whole tensor is one point.

    Tangent space {A : ⟨W, A⟩ = 0}; natural norm ‖A‖_F. dualize = (I − wwᵀ)g / ‖(I − wwᵀ)g‖;
    retract = Y/‖Y‖_F. With the unit tangent step, retract(w − η·a) = (w − η·a)/√(1 + η²).
    step = retract((W − lr·A)/max(1, |lr|)): the same point (retract ignores scale), in fp32 for
    half-precision weights and finite at any finite lr.
    """

    name = "sphere"
    retract_ignores_scale = True
    min_ndim = 1

    def dualize(self, W, G, state=None):
        dt = compute_dtype(G)
        dims = tuple(range(G.ndim))
        Gu, _ = unit_max_scale(G.to(dt), dims=dims)
        # W's own scale first (a 1e20 W overflowed ‖W‖ in float32: w became 0 and A was not tangent)
        w, _ = unit_max_scale(W.to(dt), dims=dims)
        w = w / _fro_all(w).clamp_min(1e-30)
        T = Gu - w * (w * Gu).sum()
        tn = _fro_all(T)
        A = T / tn if tn > 1e-6 * _fro_all(Gu) else torch.zeros_like(T)
        if state is not None:
            state["iterations"] = 0
            state["tangent_residual"] = float((w * A).sum().abs())
        return A.to(G.dtype)

    def retract(self, Y):
        Yu, _ = unit_max_scale(Y.to(compute_dtype(Y)), dims=tuple(range(Y.ndim)))
        n = _fro_all(Yu)
        if n == 0:
            raise ValueError("Sphere.retract: the zero tensor has no nearest point on the sphere")
        return (Yu / n).to(Y.dtype)

    def contains(self, W, tol=None):
        check_tensor(W, "Sphere.contains", min_ndim=1)
        tol = containment_tol(W, tol)
        return bool((_fro_all(W.to(compute_dtype(W))) - 1).abs() <= tol)

    def norm(self, A):
        check_tensor(A, "Sphere.norm", min_ndim=1)
        Au, amax = unit_max_scale(A.to(compute_dtype(A)), dims=tuple(range(A.ndim)))
        return _fro_all(Au) * amax.reshape(())

    def random(self, shape, generator=None, dtype=torch.float32, device=None):
        shape = check_shape(shape, "Sphere.random")
        Z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return (Z / _fro_all(Z)).to(dtype=dtype, device=device)

    def diagnostics(self, W):
        return {"norm": float(self.norm(W.detach()))}
