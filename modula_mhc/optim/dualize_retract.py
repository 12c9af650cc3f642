"""DualizeRetract: per atom, momentum → dualize in the atom's natural norm → step on its manifold."""
from __future__ import annotations

import math
import sys
import warnings
import weakref

import torch
from torch.optim import Optimizer

from .. import scalars as S
from ..dual_target import check_dual_target
from ..manifolds.base import as_tall, from_tall, is_wide
from ..module import Atom, Module

#: what a step does when a gradient holds NaN or Inf (docs/faults.md)
NONFINITE_POLICIES = ("skip", "raise", "ignore")


def _atom_of(p) -> object:
    ref = getattr(p, "_mm_atom", None)
    atom = ref() if isinstance(ref, weakref.ref) else None
    if atom is None:
        raise ValueError(f"DualizeRetract: a parameter of shape {tuple(p.shape)} does not belong to a "
                         "modula_mhc atom (no _mm_atom tag); build it with modula_mhc.atoms or pass the Module")
    return atom


def _target(coefficient) -> float:
    """Step target 1/c_a of an atom (0 for an atom without influence, c = ∞ or 0 mass)."""
    c = S.to_number(coefficient)
    if c == S.INF or not math.isfinite(c) or c <= 0:
        return 0.0
    return 1.0 / c


def skip_nonfinite_step(opt, gradients_finite, stacklevel: int) -> bool:
    """The non-finite policy ``opt.nonfinite`` for one step: True if the step must be skipped.

    ``gradients_finite()`` is only called when the policy checks; a skip counts in
    ``opt.skipped_steps`` and warns (RuntimeWarning, ``stacklevel`` counted from this function);
    "raise" raises instead."""
    if opt.nonfinite == "ignore" or gradients_finite():
        return False
    opt.skipped_steps += 1
    msg = f"non-finite gradient (NaN or Inf): optimizer step skipped ({opt.skipped_steps} so far)"
    if opt.nonfinite == "raise":
        raise FloatingPointError(msg.replace("optimizer step skipped", "policy 'raise'"))
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
    return True


def _is_real(v) -> bool:
    """A finite real number (a one-element tensor included); not a bool."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool and math.isfinite(float(v))
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: hyperparameter → (test, what it must be), checked at construction and for every param group added
_HYPER_RULES = {
    "lr": (lambda v: _is_real(v) and float(v) >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _is_real(v) and not isinstance(v, torch.Tensor) and 0.0 <= v < 1.0, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_real(v) and not isinstance(v, torch.Tensor) and v >= 0, "a finite number >= 0"),
}


def check_hyperparameters(owner: str, values: dict) -> None:
    """ValueError naming the first of ``values`` (lr, momentum, weight_decay) that breaks its rule."""
    for key, (ok, what) in _HYPER_RULES.items():
        if key in values and not ok(values[key]):
            raise ValueError(f"{owner}: {key} must be {what}, got {values[key]!r}")


#: per-parameter state entries shaped like the parameter (DualizeRetract's momentum; AdamW's moments)
_PARAM_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_state_shapes(owner: str, state_dict, params, names=None) -> None:
    """ValueError when ``state_dict`` (torch.optim's format) holds per-parameter state whose shape
    does not fit the parameter it would be loaded into (a model of other shapes): momentum/Adam
    buffers must have the parameter's shape, a Gram-space warm start (``certificate``) k×k with k
    the short side. torch.optim's own load_state_dict only compares parameter counts, so such a
    state loaded silently and failed (or broadcast) at the next step."""
    try:
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        state = state_dict["state"]
    except (KeyError, TypeError):
        return  # torch.optim reports a malformed state dict itself
    if len(saved) != len(params) or not isinstance(state, dict):
        return  # torch.optim reports the count mismatch itself
    for n, (i, p) in enumerate(zip(saved, params)):
        entry = state.get(i)
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in _PARAM_SHAPED:
                expected = tuple(p.shape)
            elif key == "certificate" and p.ndim == 2 and value.ndim == 2:
                expected = (min(p.shape),) * 2
            else:
                continue
            if tuple(value.shape) != expected:
                name = names[n] if names is not None else str(n)
                raise ValueError(f"{owner}.load_state_dict: the state dict does not fit this model: parameter "
                                 f"{name} has shape {tuple(p.shape)}, but its saved {key!r} has shape "
                                 f"{tuple(value.shape)} (expected {expected}); it comes from a model of other shapes")


def _batch_key(atom, u):
    """Key of the stack ``u`` can join, or None: the manifold must dualize stacks
    (``batched_dualize`` or ``stacks_members``) and the atom use the base dualize (target × manifold.dualize)."""
    manifold = atom.manifold
    if not (getattr(manifold, "batched_dualize", False) or getattr(manifold, "stacks_members", False)) or u.ndim != 2 \
            or type(atom).dualize_weight is not Atom.dualize_weight:
        return None
    return (atom.manifold, tuple(sorted(u.shape, reverse=True)), u.dtype, u.device)


def _dualize_all(work):
    """target·dualize(W, u) for each (atom, u, target, state) in ``work``, stacking what can be stacked."""
    out = [None] * len(work)
    stacks: dict = {}
    for i, (atom, u, target, state) in enumerate(work):
        key = _batch_key(atom, u)
        if key is None:
            out[i] = atom.dualize_weight(u, target=target, state=state)
        else:
            stacks.setdefault(key, []).append(i)
    for key, idx in stacks.items():
        manifold = key[0]
        wide = [is_wide(work[i][1]) for i in idx]
        U = torch.stack([as_tall(work[i][1], w) for i, w in zip(idx, wide)])
        # Euclidean ignores the point: its stack would be a copy of every weight for nothing
        W = torch.stack([as_tall(work[i][0].weight, w) for i, w in zip(idx, wide)]) \
            if manifold.dualize_reads_point else U
        if manifold.stacks_members:  # one state per member (warm starts, diagnostics)
            A = manifold._dualize_stack(W, U, [work[i][3] for i in idx])
        else:
            info: dict = {}
            A = manifold._dualize(W, U, info)  # inputs are the atoms' own weights and gradients
        targets = [work[i][2] for i in idx]
        if all(t == targets[0] for t in targets):  # one scaling pass for the whole stack
            A = A * targets[0]
        else:
            A = A * torch.tensor(targets, dtype=A.dtype, device=A.device).view(-1, 1, 1)
        for j, (i, w) in enumerate(zip(idx, wide)):
            out[i] = from_tall(A[j], w)
            state = work[i][3]
            if state is not None and not manifold.stacks_members:
                state.update(info)
    return out


class DualizeRetract(Optimizer):
    """DualizeRetract(params_or_module, lr=0.25, momentum=0.95, nesterov=True, weight_decay=0.0,
    nonfinite="skip").

    Per parameter W of atom a with norm coefficient c_a (modular norm ‖w‖_M = max_a c_a‖w_a‖_a):

        b ← β·b + (1 − β)·g                      (momentum buffer, b₀ = 0, as torch.optim.Muon)
        u = (1 − β)·g + β·b if nesterov else b
        A = a.dualize_weight(u, target=1/c_a)    (‖A‖_a = 1/c_a: the modular-norm steepest direction)
        W ← (1 − lr·λ)·W                          (only on manifolds closed under scaling: Euclidean, DGram)
        W ← a.step_weight(A, lr)                   (= retract(W − lr·A), Birkhoff: multiplicative)

    so one learning rate moves the whole network by lr in the modular norm. Given a Module, atoms
    and coefficients come from the tree; given parameters (or param groups), each parameter must be
    an atom's weight and gets coefficient 1. Zero gradients give zero updates.

    ``nonfinite``: what a NaN/Inf gradient does, checked before anything changes — "skip" (the
    default: RuntimeWarning, the whole step is skipped, weights and momentum untouched,
    ``skipped_steps`` counts them), "raise" (FloatingPointError, nothing updated) or "ignore" (no
    check and no cross-process sync; the NaN reaches the weights).
    """

    NONFINITE_POLICIES = NONFINITE_POLICIES

    def __init__(self, params_or_module, lr: float = 0.25, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, nonfinite: str = "skip"):
        check_hyperparameters(type(self).__name__, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        if nonfinite not in self.NONFINITE_POLICIES:
            raise ValueError(f"{type(self).__name__}: nonfinite must be one of {self.NONFINITE_POLICIES}, "
                             f"got {nonfinite!r}")
        self.nonfinite, self.skipped_steps = nonfinite, 0
        if nesterov and momentum == 0:
            nesterov = False  # nothing to look ahead with
        self._targets: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._atom_refs: dict[int, weakref.ref] = {}
        # the module given is kept alive with the optimizer: its atoms are referenced weakly (from
        # the parameters too), and DualizeRetract(mm.adapt(model)) would otherwise lose its views
        self.module = params_or_module if isinstance(params_or_module, Module) else None
        if isinstance(params_or_module, Module):
            module = params_or_module
            atoms = module.atoms()
            coefficients = module.norm_coefficients()
            names = {m: n for n, m in module.named_modules()}
            params = []
            for a, c in zip(atoms, coefficients):
                if a.weight is None:
                    raise ValueError("DualizeRetract: the module is symbolic (no tensors); build it with numbers")
                if id(a.weight) in self._targets:
                    continue  # a shared atom appears once
                self._names[id(a.weight)] = names.get(a, "") or type(a).__name__
                self._targets[id(a.weight)] = check_dual_target(_target(c), a.weight, self._names[id(a.weight)],
                                                                "DualizeRetract")
                self._atom_refs[id(a.weight)] = weakref.ref(a)
                params.append(a.weight)
            if not params:
                raise ValueError("DualizeRetract: the module has no atoms with weights")
            params_or_module = params
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params_or_module, defaults)
        for i, p in enumerate(self._all_params()):
            if id(p) not in self._targets:
                atom = _atom_of(p)
                self._targets[id(p)] = 1.0
                self._names[id(p)] = str(i)
                self._atom_refs[id(p)] = weakref.ref(atom)

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _atom(self, p):
        atom = self._atom_refs[id(p)]()
        if atom is None:
            raise RuntimeError("DualizeRetract: the atom owning a parameter no longer exists")
        return atom

    def add_param_group(self, param_group):
        """torch.optim's add_param_group, checked before anything is added: the group's lr, momentum
        and weight_decay (ValueError as in the constructor), no parameter twice in the group (torch
        only warns, and such a parameter was stepped twice per step), and every tensor an atom's weight."""
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (set, type(None))):
            params = param_group["params"]
            if not isinstance(params, torch.Tensor):  # (torch raises on a set) a generator is read once
                param_group["params"] = params = list(params)
            params = [params] if isinstance(params, torch.Tensor) else params
            check_hyperparameters(type(self).__name__, {k: v for k, v in param_group.items() if k in _HYPER_RULES})
            if len({id(p) for p in params}) != len(params):
                raise ValueError(f"{type(self).__name__}: a parameter group lists a parameter more than once")
            registering = hasattr(self, "_targets") and hasattr(self, "_atom_refs")
            atoms = {id(p): _atom_of(p) for p in params if isinstance(p, torch.Tensor)
                     and registering and id(p) not in self._targets}
        else:
            atoms = {}
        base = Optimizer.add_param_group
        # torch wraps it in a lazy dynamo.disable that imports torch._dynamo (~3 s and sympy) on the
        # first call, i.e. in every process that builds an optimizer; as in ``step``, only a process
        # that imported dynamo itself can be compiling
        (base if "torch._dynamo" in sys.modules else getattr(base, "__wrapped__", base))(self, param_group)
        for p in param_group["params"]:
            if id(p) in atoms:
                self._targets[id(p)] = 1.0
                self._names[id(p)] = str(len(self._names))
                self._atom_refs[id(p)] = weakref.ref(atoms[id(p)])

    def _gradients_finite(self) -> bool:
        """True when every gradient is finite (subclasses may agree on this across processes)."""
        grads = [p.grad for p in self._all_params() if p.grad is not None and p.grad.numel()]
        if not grads:
            return True
        # min and max of every gradient (NaN propagates, ±Inf shows) in one pass each, no temporaries,
        # and a single host sync (on CPU several times cheaper than an ∞-norm or isfinite per tensor)
        return bool(torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).isfinite().all())

    def _skip_nonfinite(self) -> bool:
        """Apply the non-finite policy: True if this step must be skipped (raises under "raise")."""
        return skip_nonfinite_step(self, self._gradients_finite, stacklevel=4)

    def _update(self, p, G, group):
        """One parameter's step (see ``_update_many``)."""
        self._update_many([(p, G, group)])

    def _update_many(self, work):
        """The step of every (parameter, gradient, group) in ``work``: momentum, dualize with target
        1/c_a, decay, then the manifold step (each atom's weight is updated in place).

        Atoms whose manifold dualizes a stack as a batch (``Manifold.batched_dualize``, or
        ``stacks_members`` with one state per member) and that keep the base atom's dualize are
        dualized together, one call per (manifold, tall shape, dtype, device): one msign over a stack
        instead of one per matrix; one Stiefel/DGram dual solve whose members leave once certified."""
        items = [(p, self._atom(p), u, group) for (p, _, group), u in zip(work, self._directions(work))]
        directions = _dualize_all([(atom, u, self._targets[id(p)], self.state[p]) for p, atom, u, _ in items])
        for (p, atom, _, group), A in zip(items, directions):
            lr, wd = float(group["lr"]), group["weight_decay"]
            if wd != 0 and getattr(atom.manifold, "admits_scaling", False):
                atom.weight.mul_(1 - lr * wd)
            atom.step_weight(A, lr)

    def _directions(self, work):
        """The momentum direction u of each (parameter, gradient, group) in ``work``:
        b ← βb + (1 − β)g; u = (1 − β)g + βb (Nesterov) or b. One foreach call per group."""
        out: list = [None] * len(work)
        by_group: dict = {}
        for i, (_, _, group) in enumerate(work):
            by_group.setdefault(id(group), (group, []))[1].append(i)
        for group, idx in by_group.values():
            beta = group["momentum"]
            grads = [work[i][1] for i in idx]
            if beta <= 0:
                dirs = grads
            else:
                bufs = []
                for i in idx:
                    state = self.state[work[i][0]]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(work[i][1], memory_format=torch.preserve_format)
                    bufs.append(buf)
                torch._foreach_lerp_(bufs, grads, 1 - beta)
                dirs = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
            for i, u in zip(idx, dirs):
                out[i] = u
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One dualize-then-retract step for every parameter with a gradient; returns closure().
        Runs eagerly under torch.compile (docs/training.md, "torch.compile")."""
        # Eager even inside torch.compile(opt.step) or a compiled training step: the dual solver
        # stops on data (host syncs by design), the Muon path is a few batched matmuls already, and
        # inductor in torch 2.13 fails to build the traced step on CPU (KeyError 'bufN'). Only when
        # something imported torch._dynamo can a compile be running; importing it here would cost
        # seconds (and sympy) in every process.
        if "torch._dynamo" in sys.modules:
            return self._eager_step(closure)
        return self._step_once(closure)

    def _step_once(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._all_params():
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients (a parameter of "
                                f"shape {tuple(p.shape)} has one): use a dense embedding or torch.optim.SparseAdam")
        if not self._skip_nonfinite():
            self._step_parameters()
        return loss

    # torch's lazy dynamo.disable (it imports torch._dynamo on first use)
    _eager_step = torch._disable_dynamo(_step_once)

    def _step_parameters(self):
        """Update every parameter that has a gradient and influence (subclasses distribute this)."""
        self._update_many([(p, p.grad, group) for group in self.param_groups for p in group["params"]
                           if p.grad is not None and self._targets[id(p)] != 0.0])

    def state_dict(self):
        """torch.optim's state dict plus ``skipped_steps``."""
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict):
        """torch.optim's load_state_dict (plus ``skipped_steps``); ValueError, with nothing changed,
        when a saved buffer's shape does not fit its parameter (``check_state_shapes``) or the dict is
        one rank's share of a distributed state."""
        state_dict = dict(state_dict)
        if state_dict.get("rank_share") is not None:  # one rank's part: the others' momentum would restart at 0
            raise ValueError(f"{type(self).__name__}.load_state_dict: this is one rank's share of a "
                             "DistributedDualizeRetract state (state_dict()); save and load its full_state_dict()")
        params = self._all_params()
        check_state_shapes(type(self).__name__, state_dict, params, [self._names.get(id(p)) for p in params])
        skipped = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped

    def diagnostics(self) -> dict:
        """{atom name: {manifold, top singular value / column norms / …, iterations, tangent_residual,
        duality_gap (certified relative gap), certified of the last step}} (names from the module
        tree, else indices)."""
        out = {}
        for p in self._all_params():
            atom = self._atom(p)
            d = {"manifold": atom.manifold.name, "target": self._targets[id(p)]}
            d.update(atom.diagnostics())
            st = self.state.get(p, {})
            for k in ("iterations", "tangent_residual", "duality_gap", "certified"):
                if k in st:  # tensors are kept on device during steps; converted only here
                    d[k] = float(st[k]) if isinstance(st[k], torch.Tensor) else st[k]
            out[self._names[id(p)]] = d
        return out
