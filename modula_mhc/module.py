"""The module base: every network piece knows its mass, sensitivity, sharpness and norm.

A :class:`Module` is a ``torch.nn.Module`` that additionally carries

* ``mass`` μ ≥ 0 — its share of learning,
* ``sensitivity`` ν ≥ 0 — Lipschitz constant in its input at well-normed weights and inputs (each
  module states its domain; :func:`modula_mhc.claims.certify` checks it on a batch and gives the
  local constants that hold there),
* ``sharpness`` (α, β, γ) — bounds on the weight-weight, weight-input and input-input second
  derivatives (see docs/algebra.md for the derivation of the composition rules),
* the *modular norm* ‖w‖_M = max_a c_a ‖w_a‖_a over its atoms a, with coefficients c_a derived
  recursively from the construction (``norm_coefficients``).

Three kinds of module exist: :class:`Atom` (owns exactly one ``nn.Parameter`` called ``weight``),
:class:`Bond` (no weights) and compounds (built from other modules with ``@``, ``+``, ``*``,
``**``; see :mod:`modula_mhc.algebra`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Collection
from typing import Any, NamedTuple

import torch
from torch import nn

from . import manifolds
from . import scalars as S
from ._repr import compact_repr, short_number
from .atom_tag import AtomTag, _no_tag  # noqa: F401  (_no_tag: models pickled before it moved name it here)
from .dual_target import check_dual_target

_STATIC_DEPTH = [0]  # > 0 inside static_constants(): local (measured) stats are ignored


@contextlib.contextmanager
def static_constants():
    """Inside this context every module reports its static (declared) constants, even while
    :func:`modula_mhc.claims.certify` has attached local input statistics to it. The modular norm
    is always built this way: it is a fixed geometry, not a certificate."""
    _STATIC_DEPTH[0] += 1
    try:
        yield
    finally:
        _STATIC_DEPTH[0] -= 1


#: The constructions Module's operators build: "compose" (@), "sum" (+), "scale" (a * M, M / a),
#: "scale_input" (M * a) and "repeat" (M ** L). modula_mhc.algebra defines them and fills this table
#: when it is imported (``import modula_mhc`` does); this file cannot import it, since its classes
#: subclass Module.
CONSTRUCTIONS: dict = {}


def _construction(name: str):
    try:
        return CONSTRUCTIONS[name]
    except KeyError:
        raise RuntimeError(f"the module algebra is not loaded (no {name!r} construction): "
                           f"import modula_mhc (or modula_mhc.algebra) first") from None


class Sharpness(NamedTuple):
    """Second-order constants: ‖∇²_ww f‖ ≤ α, ‖∇²_wx f‖ ≤ β, ‖∇²_xx f‖ ≤ γ (bilinear bounds in the
    modular norm of the weights and the RMS norm of the input)."""

    alpha: object = 0.0
    beta: object = 0.0
    gamma: object = 0.0


class Module(nn.Module):
    """Base class. Subclasses define ``mass``, ``sensitivity``, ``sharpness`` and
    ``_coefficient_map`` (atoms → norm coefficient)."""

    #: feature size of the input's last dimension (None: any / inferred; an int, a sympy expression,
    #: or a tuple of them after a tuple-valued module)
    in_dim: Any = None
    #: feature size of the output's last dimension (None: same as input for dim-preserving modules)
    out_dim: Any = None
    #: True for modules whose output has the input's last-dim size (activations, norms, …)
    preserves_dim = False

    def __repr__(self):
        """One line per module, containers spliced into their parents (see modula_mhc._repr)."""
        return compact_repr(self)

    # ----------------------------------------------------------------- properties to override
    @property
    def mass(self):
        raise NotImplementedError  # abstract: defined by Atom, Bond and every compound

    @property
    def sensitivity(self):
        raise NotImplementedError  # abstract

    @property
    def sharpness(self) -> Sharpness:
        raise NotImplementedError  # abstract

    @property
    def norm_sensitivity(self):
        """The sensitivity the modular norm is built with (the ν of the composition rule for norm
        coefficients). Equal to ``sensitivity`` everywhere except in modules that choose to weigh
        their parts by their constants at initialisation rather than by a loose worst-case bound
        (HyperConnections with ``norm_at="init"``, attention with several heads); ``sensitivity``
        stays the certified claim. Always static (see :func:`static_constants`)."""
        with static_constants():
            return self.sensitivity

    @property
    def weight_gain(self):
        """κ with ‖∇_w f · Δw‖ ≤ κ · ‖Δw‖_M (certified weight well-normedness). κ = 1 whenever the
        modular norm is built from the certified sensitivities; it exceeds 1 where a module builds
        its norm from smaller constants (``norm_sensitivity`` < ``sensitivity``: attention with
        several heads, HC/mHC with ``norm_at="init"``) or, under ``claims.certify``, where a
        weight sees inputs of RMS > 1 (docs/algebra.md, "Certified domain")."""
        return 1.0

    def local_stats(self):
        """The input statistics ``claims.certify`` attached to this module (None outside it, and
        inside ``static_constants()``). Modules whose constants hold only on a domain (RMSNorm:
        input RMS ≥ 1; attention: q, k, v RMS ≤ 1; HC: unit streams; atoms: ‖W‖ ≤ 1) return their
        local constants from these statistics."""
        if _STATIC_DEPTH[0]:
            return None
        return self.__dict__.get("_local_stats")

    def _coefficient_map(self) -> dict:
        """{atom: c_a} with ‖w‖_M = max_a c_a ‖w_a‖_a (atoms of zero mass are absent)."""
        raise NotImplementedError  # abstract

    # ----------------------------------------------------------------- derived queries
    def atoms(self) -> list:
        """Atoms in the order of ``self.parameters()``."""
        return [m for m in self.modules() if isinstance(m, Atom)]

    def norm_coefficients(self) -> list:
        """c_a for each atom, aligned with ``atoms()``; ``inf`` for atoms with no influence
        (zero mass), so that the target t/c_a of such an atom is 0."""
        with static_constants():
            cmap = self._coefficient_map()
        return [cmap.get(a, S.infinity()) for a in self.atoms()]

    def _aligned(self, tensors, what):
        atoms = self.atoms()
        if tensors is None:
            return atoms, [a.weight for a in atoms]
        tensors = list(tensors)
        if len(tensors) != len(atoms):
            raise ValueError(f"{what}: got {len(tensors)} tensors for {len(atoms)} parameters "
                             f"(they must be aligned with module.parameters())")
        for a, t in zip(atoms, tensors):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}: expected tensors (or None) aligned with module.parameters(), "
                                f"got {type(t).__name__}")
            if a.weight is not None and t is not None and t.shape != a.weight.shape:
                raise ValueError(f"{what}: tensor of shape {tuple(t.shape)} given for "
                                 f"{type(a).__name__} weight of shape {tuple(a.weight.shape)}")
        return atoms, tensors

    @torch.no_grad()
    def norm(self, tensors=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Modular norm max_a c_a ‖t_a‖_a of the weights (or of weight-shaped ``tensors``), accumulated
        in float64 and returned in ``dtype`` (float32 gives inf past 3.4e38: the coefficients of deep
        ``**`` stacks reach 1e40; ask for torch.float64 there)."""
        if tensors is None and any(a.weight is None for a in self.atoms()):
            raise ValueError("norm(): this module has symbolic dimensions and so no weights; build it with numbers, "
                             "or pass weight-shaped tensors (its constants: modula_mhc.symbolic.describe)")
        atoms, tensors = self._aligned(tensors, "norm")
        values = []
        for a, c, t in zip(atoms, self.norm_coefficients(), tensors):
            c = S.to_number(c)
            if t is None or c == S.INF:
                continue
            # float64: coefficients of deep stacks reach 1e±40–60 ((0.1·M) ** 64: 6.4e-63), past float32
            values.append(c * a.weight_norm(t).double())
        if not values:
            return torch.zeros((), dtype=dtype)
        return torch.stack([v.reshape(()) for v in values]).max().to(dtype)

    def dualize(self, grads, target_norm: float = 1.0) -> list:
        """Steepest direction in the modular norm: atom a gets its own dual with norm
        target/c_a, so ``norm(dualize(g, t)) == t`` (0 for a zero gradient, never NaN)."""
        if not (S.is_number(target_norm) and target_norm >= 0):
            raise ValueError(f"dualize: target_norm must be a finite number >= 0, got {target_norm!r}")
        atoms, grads = self._aligned(grads, "dualize")
        out: list[torch.Tensor | None] = []
        for a, c, g in zip(atoms, self.norm_coefficients(), grads):
            c = S.to_number(c)
            if g is None:
                out.append(None)
            elif c == S.INF or c == 0:
                out.append(torch.zeros_like(g))
            else:
                out.append(a.dualize_weight(g, check_dual_target(target_norm / c, g, type(a).__name__, "dualize")))
        return out

    @torch.no_grad()
    def retract(self):
        """Put every atom's weight back on its manifold, in place."""
        for a in self.atoms():
            a.retract_()
        return self

    # ----------------------------------------------------------------- algebra (see algebra.py)
    def __matmul__(self, other):
        """``M2 @ M1``: the composition M2 ∘ M1 (M1 runs first)."""
        return _construction("compose")(self, other)

    def __rmatmul__(self, other):
        return _construction("compose")(other, self)

    def __add__(self, other):
        """``M1 + M2``: x ↦ M1(x) + M2(x)."""
        return _construction("sum")(self, other)

    def __radd__(self, other):
        return _construction("sum")(other, self)

    def __mul__(self, a):
        """``M * a`` scales the *input*, as in Modula: x ↦ M(a·x) (= ``M @ (a * Identity())``)."""
        if isinstance(a, Module):
            raise TypeError("M * N is not defined for two modules; compose with M @ N or add with M + N")
        return _construction("scale_input")(self, a)

    def __rmul__(self, a):
        """``a * M`` scales the *output*: x ↦ a·M(x) (sensitivity |a|·ν, norm |a|·‖w‖), as in Modula."""
        return _construction("scale")(a, self)

    def __truediv__(self, a):
        """``M / a`` = (1/a)·M: the output divided by a."""
        if S.is_zero(a):
            raise ValueError(f"{type(self).__name__} / 0: cannot divide a module's output by zero")
        return _construction("scale")(1 / a, self)

    def __pow__(self, depth):
        """``M ** L``: L copies of M with their own weights, composed."""
        return _construction("repeat")(self, depth)

    # ----------------------------------------------------------------- dims
    def bind_input_dims(self, dims: tuple):
        """Called by the algebra when this module follows a tuple-valued module whose output widths
        are ``dims``; modules that merge tuples (Add, Concat) check and derive widths here."""

    def bind_dim(self, dim):
        """Fix the width of a dimension-agnostic module (called by the algebra)."""
        if not self.preserves_dim:
            return
        if self.in_dim is not None and S.is_number(self.in_dim) and S.is_number(dim) and self.in_dim != dim:
            raise ValueError(f"{type(self).__name__} is already bound to width {self.in_dim}; "
                             f"cannot reuse it at width {dim}")
        self.in_dim = dim
        self.out_dim = dim


class Bond(Module):
    """A module without weights: mass 0; subclasses set sensitivity and sharpness."""

    _sensitivity = 1.0
    _sharpness = Sharpness(0.0, 0.0, 0.0)

    @property
    def mass(self):
        return 0.0

    @property
    def sensitivity(self):
        return self._sensitivity

    @property
    def sharpness(self):
        return self._sharpness

    def _coefficient_map(self):
        return {}


class Atom(Module):
    """A module that owns exactly one ``nn.Parameter`` named ``weight`` living on a manifold.

    Subclasses implement ``forward`` and may override the natural norm (``weight_norm``),
    ``dualize_weight`` and ``retract_``; the defaults delegate to ``self.manifold``.
    In symbolic mode (a sympy dimension) no tensor is allocated and ``weight`` is None.
    """

    #: manifold names an atom accepts (None: any registered manifold)
    allowed_manifolds: Collection[str] | None = None

    def __init__(self, shape, manifold="euclidean", mass=1.0, role=None):
        super().__init__()
        self._mass = S.checked_mass(type(self).__name__, mass)
        self.role = role
        self.shape = tuple(shape)
        for s in self.shape:
            if not S.is_symbolic(s) and (not S.is_number(s) or int(s) != s or s <= 0):
                raise ValueError(f"{type(self).__name__}: dimensions must be positive integers, got {self.shape}")
        self.symbolic = S.is_symbolic(*self.shape)
        self.manifold = self._check_manifold(manifold)
        if self.symbolic:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(tuple(int(s) for s in self.shape)))
            self.reset_parameters()

    def _check_manifold(self, manifold):
        m = manifolds.get(manifold)
        if self.allowed_manifolds is not None and m.name not in self.allowed_manifolds:
            raise ValueError(f"{type(self).__name__} supports manifolds {sorted(self.allowed_manifolds)}, "
                             f"got {m.name!r}")
        return m

    def _tag(self):
        if self.weight is not None:
            self.weight._mm_atom = AtomTag(self)

    def __setstate__(self, state):
        # unpickled or deep-copied: the weight is a new tensor whose tag was dropped
        super().__setstate__(state)
        self._tag()

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """Initialise on the manifold (at the scale of the natural norm)."""
        if self.weight is None:
            return
        self.weight.copy_(self.manifold.random(self.weight.shape, generator=generator, dtype=self.weight.dtype,
                                               device=self.weight.device))
        self._tag()

    # -- module properties
    @property
    def mass(self):
        return self._mass

    @mass.setter
    def mass(self, value):
        self._mass = S.checked_mass(type(self).__name__, value)

    @property
    def sensitivity(self):
        """1 at well-normed weights (‖W‖ ≤ 1); under ``claims.certify`` max(1, ‖W‖) for the atoms
        whose map is linear in x with operator norm ‖W‖ (the claims module sets ``weight_norm``)."""
        st = self.local_stats()
        return 1.0 if st is None else max(1.0, st.get("weight_norm", 1.0))

    @property
    def sharpness(self):
        return Sharpness(0.0, 1.0, 0.0)

    @property
    def weight_gain(self):
        """‖ΔW x‖ ≤ ‖ΔW‖·‖x‖: 1 for well-normed inputs (RMS ≤ 1); under ``claims.certify`` the
        largest input RMS seen (at least 1)."""
        st = self.local_stats()
        return 1.0 if st is None else max(1.0, st.get("input_rms", 1.0))

    def _coefficient_map(self):
        return {} if S.is_zero(self._mass) else {self: 1.0}

    # -- the natural norm, its dual and the manifold
    def weight_norm(self, W=None) -> torch.Tensor:
        """Natural norm ‖W‖_a of this atom (of its weight if W is None)."""
        return self.manifold.norm(self.weight if W is None else W)

    def dualize_weight(self, G, target=1.0, state=None) -> torch.Tensor:
        """argmax ⟨G, A⟩ over tangent directions with ‖A‖_a = target. G must have the weight's
        shape: this is the optimizer's hot path and is not checked (``Module.dualize`` checks)."""
        return target * self.manifold._dualize(self.weight, G, state)

    @torch.no_grad()
    def step_weight(self, A, lr):
        """W ← manifold.step(W, A, lr) = retract(W − lr·A) (in place)."""
        self.manifold._step_(self.weight, A, lr)

    @torch.no_grad()
    def retract_(self):
        if self.weight is not None:
            self.weight.copy_(self.manifold._retract(self.weight))

    @torch.no_grad()
    def set_manifold(self, manifold):
        """Move this atom to another manifold (the weight is retracted onto it)."""
        self.manifold = self._check_manifold(manifold)
        self.retract_()
        return self

    def diagnostics(self) -> dict:
        return self.manifold.diagnostics(self.weight) if self.weight is not None else {}

    def _repr_dims(self) -> str:
        """The dimensions as ``extra_repr`` shows them (atoms print their constructor's arguments)."""
        return f"shape={self.shape}"

    def extra_repr(self):
        """Shape, then the manifold when it is not Euclidean, the mass and the role (compact)."""
        parts = [self._repr_dims()] + ([f"manifold={self.manifold.name}"] if self.manifold.name != "euclidean" else [])
        return ", ".join(parts + [f"mass={short_number(self._mass)}"] + ([f"role={self.role}"] if self.role else []))
