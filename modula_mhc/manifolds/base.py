"""The manifold interface (dualize, retract, step) and the small matrix helpers every manifold shares.

Weights are stored as torch stores them, shape (..., out, in). Matrix manifolds put their
constraint on the Gram matrix of the smaller side, so a wide matrix (out < in) is handled through
its transpose: ``as_tall`` / ``from_tall`` do that in one place.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from ..kernels import gram_polar

#: dtypes the manifold maths runs in (lower precisions are lifted to float32 and cast back)
_COMPUTE_DTYPES = (torch.float32, torch.float64)


class Manifold:
    """A set of weights with a natural norm on its tangent spaces.

    * ``dualize(W, G, state)``: argmax ⟨G, A⟩ over tangent vectors A at W with ``norm(A) ≤ 1``
      (norm 1 unless G has no tangent part, then exactly 0).
    * ``retract(Y)``: a point on the manifold near Y; identity on the manifold, first-order correct.
    * ``step(W, A, lr)``: the optimizer's move, by default ``retract(W − lr·A)``.

    A subclass writes these three as plain maths. Each gets a public wrapper that checks its
    inputs (tensor, floating dtype, ``min_ndim``, equal shapes, ``check_input``); the unchecked
    bodies stay reachable as ``_dualize``/``_retract``/``_step``, which atoms and the optimizer
    call on weights they validated once, at construction (no checks on the per-step hot path).
    """

    name = "manifold"
    #: True when c·W stays on the manifold for every c > 0 (a cone): decoupled weight decay is then
    #: meaningful; on the other manifolds the retraction would undo it.
    admits_scaling = False
    #: True when ``dualize`` treats leading dims as a batch of independent matrices and writes only
    #: per-call entries to ``state``: the optimizer then dualizes same-shape weights as one stack
    batched_dualize = False
    #: True when ``_dualize_stack(W, G, states)`` dualizes a stack with one state dict per member
    #: (Stiefel, DGram: each weight keeps its own warm start): the optimizer then stacks
    #: same-shape weights too, and the solve's per-iteration overhead is shared
    stacks_members = False
    #: True when retract(c·Y) = retract(Y) for every c > 0 (Sphere, Oblique): ``_step`` then divides
    #: W − lr·A by max(1, |lr|) before retracting, so no finite lr overflows
    retract_ignores_scale = False
    #: False when ``dualize`` ignores the point W (Euclidean): a stacked dualize then skips
    #: gathering the weights
    dualize_reads_point = True
    #: the fewest dims a point or tangent may have (matrices; Euclidean and Sphere also take vectors)
    min_ndim = 2

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _install_checks(cls)

    def check_input(self, X, what: str) -> None:
        """Raise TypeError/ValueError unless X can be a point or tangent of this manifold."""
        check_tensor(X, what, min_ndim=self.min_ndim)

    # ------------------------------------------------------------------ interface
    # (the public names are replaced by checked wrappers of the underscored bodies below)
    def dualize(self, W: torch.Tensor, G: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def retract(self, Y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, W: torch.Tensor, A: torch.Tensor, lr: float) -> torch.Tensor:
        raise NotImplementedError

    def _dualize(self, W: torch.Tensor, G: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _retract(self, Y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, W: torch.Tensor, A: torch.Tensor, lr: float) -> torch.Tensor:
        """W_new = retract(W − lr·A), with W − lr·A formed in ``step_dtype`` (fp32 for bf16/fp16
        weights) and returned in W's dtype: formed in fp16, lr·A overflowed to inf from |lr·A| ≈ 6.6e4
        and the retraction returned NaN or zero columns without a word. A manifold whose retraction
        ignores positive scale (``retract_ignores_scale``) retracts (W − lr·A)/max(1, |lr|) instead:
        the same point, finite at any finite lr."""
        if self.retract_ignores_scale:
            return self._retract(scale_free_difference(W, A, lr)).to(W.dtype)
        dt = step_dtype(W, lr)
        return self._retract(W.to(dt) - lr * A.to(dt)).to(W.dtype)

    def _step_(self, W: torch.Tensor, A: torch.Tensor, lr: float) -> None:
        """W ← step(W, A, lr) in place (a manifold whose step is W − lr·A overrides this to skip
        the temporary)."""
        W.copy_(self._step(W, A, lr))

    def contains(self, W: torch.Tensor, tol: float | None = None) -> bool:
        """Whether W lies on the manifold to ``tol`` (default ``containment_tol``: 1e-4, or the
        rounding of half-precision storage)."""
        raise NotImplementedError

    def norm(self, A: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def random(self, shape, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        raise NotImplementedError

    def diagnostics(self, W: torch.Tensor) -> dict:
        return {}

    # ------------------------------------------------------------------ conveniences
    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


def _checked(public: str, body: Callable) -> Callable:
    """``body`` behind the input checks of ``public`` (dualize(W, G, state), retract(Y), step(W, A, lr))."""
    def checked_point(self, Y):
        what = f"{type(self).__name__}.{public}"
        self.check_input(Y, what)
        check_finite(Y, what)
        return body(self, Y)

    def checked_pair(self, W, X, *args, **kwargs):
        what = f"{type(self).__name__}.{public}"
        check_same_shape(W, X, what)
        self.check_input(X, what)
        check_finite(W, what, "point")
        check_finite(X, what, "gradient" if public == "dualize" else "direction")
        if public == "step":
            lr = args[0] if args else kwargs.get("lr")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
                raise ValueError(f"{what}: lr must be a finite number, got {lr!r}")
            out = body(self, W, X, *args, **kwargs)
            # a point beyond the weight dtype's range (Euclidean or DGram at |lr·A| > 6.5e4 in fp16)
            # came back as inf/NaN without a word
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"{what}: the new point has NaN or inf entries: W − lr·A (lr = {lr!r}) "
                                 f"leaves the range of {W.dtype}")
            return out
        return body(self, W, X, *args, **kwargs)
    checked = checked_point if public == "retract" else checked_pair
    functools.update_wrapper(checked, body)
    checked.__name__ = public
    return checked


def _install_checks(cls) -> None:
    """For each of dualize/retract/step that ``cls`` defines (as the underscored body or the public
    name): ``_name`` = the body, ``name`` = the body behind its input checks."""
    for public in ("dualize", "retract", "step"):
        body = cls.__dict__.get("_" + public) or cls.__dict__.get(public)
        if body is None:
            continue
        setattr(cls, "_" + public, body)
        setattr(cls, public, _checked(public, body))


_install_checks(Manifold)


# ---------------------------------------------------------------------- shape and dtype helpers
def check_tensor(X, what: str, min_ndim: int = 2) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(X).__name__}")
    if not X.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {X.dtype}")
    if X.ndim < min_ndim:
        raise ValueError(f"{what}: expected a tensor with at least {min_ndim} dims (..., out, in), "
                         f"got shape {tuple(X.shape)}")
    if X.numel() == 0:  # no point of any manifold: each one failed differently (IndexError, False, …)
        raise ValueError(f"{what}: expected a non-empty tensor, got shape {tuple(X.shape)}")


def check_finite(X: torch.Tensor, what: str, role: str = "input") -> None:
    """A NaN or inf entry is an error at the public entry points (it made dualize return an exact
    0, as for a gradient without tangent part, and retract a zero column)."""
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{what}: the {role} has NaN or inf entries")


def check_same_shape(W, G, what: str) -> None:
    if not isinstance(W, torch.Tensor) or not isinstance(G, torch.Tensor):
        raise TypeError(f"{what}: expected tensors, got {type(W).__name__} and {type(G).__name__}")
    if W.shape != G.shape:
        raise ValueError(f"{what}: point of shape {tuple(W.shape)} and tangent/gradient of shape "
                         f"{tuple(G.shape)} differ")


#: ``contains``'s default tolerance; points stored in half precision are on a manifold only to the
#: rounding of their entries (u = eps/2 relative; a Gram entry of unit columns, a row sum or a norm
#: moves by ≤ 2u), so theirs is HALF_TOL_EPS·eps: bf16 9.8e-3, fp16 1.2e-3
CONTAINS_TOL, HALF_TOL_EPS = 1e-4, 1.25


def containment_tol(W: torch.Tensor, tol: float | None) -> float:
    """``tol`` if given, else CONTAINS_TOL, or HALF_TOL_EPS·eps for bf16/fp16 W (their own rounding)."""
    if tol is not None:
        return tol
    if W.dtype in (torch.bfloat16, torch.float16):
        return max(CONTAINS_TOL, HALF_TOL_EPS * torch.finfo(W.dtype).eps)
    return CONTAINS_TOL


def compute_dtype(X: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return X.dtype if X.dtype in _COMPUTE_DTYPES else torch.float32


def step_dtype(W: torch.Tensor, lr: float) -> torch.dtype:
    """The dtype W − lr·A is formed in: ``compute_dtype(W)``, or float64 for |lr| ≥ 1e30, where lr
    itself is beyond float32's range (lr·A was inf before any retraction could act)."""
    return compute_dtype(W) if abs(float(lr)) < 1e30 else torch.float64


def is_wide(X: torch.Tensor) -> bool:
    return X.size(-2) < X.size(-1)


def as_tall(X: torch.Tensor, wide: bool) -> torch.Tensor:
    """The matrix whose columns carry the constraint: X itself when tall, Xᵀ when wide."""
    return X.mT if wide else X


from_tall = as_tall  # transposing is its own inverse


def unit_max_scale(X: torch.Tensor, dims=(-2, -1)):
    """(X / max|X|, max|X|) per matrix, zero matrices left at zero; keeps 1e-30 and 1e30 gradients
    inside the float range before any norm is squared."""
    amax = X.abs().amax(dim=dims, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return X / safe, amax


def unit_columns(X: torch.Tensor):
    """(X with each column divided by its ℓ2 norm, the norms), columns of zeros left at zero. Each
    column is first divided by its largest entry, so norms of 1e-35 or 1e30 columns neither
    underflow nor overflow when squared (a clamp at 1e-30 left 1e-35 columns at norm 3e-5). A column
    with a NaN or inf entry stays NaN (it was set to zero, so DGram.contains accepted a NaN matrix)."""
    Xu, amax = unit_max_scale(X, dims=(-2,))
    n = torch.linalg.vector_norm(Xu, dim=-2, keepdim=True)
    unit = torch.where(n == 0, torch.zeros_like(Xu), Xu / torch.where(n > 0, n, torch.ones_like(n)))
    return unit, (n * amax).squeeze(-2)


def scale_free_difference(W: torch.Tensor, A: torch.Tensor, lr: float) -> torch.Tensor:
    """(W − lr·A)/c with c = max(1, |lr|), in W's compute dtype (float64 once c ≥ 1e30, where W/c
    would leave float32's range): for a retraction that ignores positive scale (Sphere, Oblique)
    retract of this is retract(W − lr·A), with no overflow at any finite lr (lr = 1e39 made
    W − lr·A inf in float32, and the retraction NaN)."""
    lr = float(lr)
    c = max(1.0, abs(lr))
    dt = step_dtype(W, lr)
    if c == 1.0:
        return W.to(dt) - lr * A.to(dt)
    return W.to(dt) / c - (lr / c) * A.to(dt)


def fro(X: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per matrix, shape (..., 1, 1)."""
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)


def inner(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product ⟨X, Y⟩ per matrix, shape (...)."""
    return (X * Y).sum(dim=(-2, -1))


def sym(X: torch.Tensor) -> torch.Tensor:
    """sym(X) = (X + Xᵀ)/2."""
    return 0.5 * (X + X.mT)


def polar(Y: torch.Tensor) -> torch.Tensor:
    """Polar factor of a tall (..., m, n) matrix, exact to float rounding (float64 Gram route,
    ``kernels.gram_polar``); a rank-deficient Y raises ValueError (its polar factor is not unique)."""
    return gram_polar(Y, strict=True)


def spectral_norm(A: torch.Tensor) -> torch.Tensor:
    """Exact ‖A‖₂ per matrix (via singular values), shape A.shape[:-2]; for tests and diagnostics."""
    Af = A.to(compute_dtype(A))
    scaled, amax = unit_max_scale(Af)
    return torch.linalg.matrix_norm(scaled, ord=2) * amax[..., 0, 0]


def semi_orthogonal(shape, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
    """A Haar-random matrix with orthonormal columns (tall) or rows (wide), batched over leading dims."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        v = torch.randn(shape, generator=generator, dtype=torch.float64, device="cpu")
        return (v / torch.linalg.vector_norm(v)).to(dtype=dtype, device=device)
    m, n = shape[-2:]
    wide = m < n
    tall_shape = shape[:-2] + ((n, m) if wide else (m, n))
    Z = torch.randn(tall_shape, generator=generator, dtype=torch.float64, device="cpu")
    Q, R = torch.linalg.qr(Z)
    # fix the sign ambiguity of QR so the distribution is Haar
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    Q = Q * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(-2)
    Q = Q.mT if wide else Q
    return Q.contiguous().to(dtype=dtype, device=device)


def check_shape(shape, what: str) -> tuple:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{what}: shape must be a sequence of ints, got {shape!r}") from None
    if any(s <= 0 for s in shape):
        raise ValueError(f"{what}: dimensions must be positive, got {shape}")
    return shape


def rms(X: torch.Tensor) -> torch.Tensor:
    """‖X‖_F/√numel per matrix, shape (..., 1, 1)."""
    return fro(X) / math.sqrt(X.size(-2) * X.size(-1))
