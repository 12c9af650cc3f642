"""DualizeAdamW: DualizeRetract for the matrices, an inner AdamW for the plain parameters (the Muon
habit: embeddings, head, gains, biases).

It is a small wrapper: the matrices go to an unchanged :class:`~modula_mhc.optim.DualizeRetract`
(with the norm coefficients of the whole adapted module), the rest to ``torch.optim.AdamW``.
``param_groups`` lists both optimizers' groups (DualizeRetract's first), so LR and momentum
schedulers drive both; each group keeps its own lr.
"""
from __future__ import annotations

import fnmatch
import weakref
from collections import OrderedDict

import torch
from torch import nn

from ..module import Module
from ..optim.dualize_retract import DualizeRetract, check_state_shapes, skip_nonfinite_step

__all__ = ["ADAMW_ROLES", "DualizeAdamW"]

#: roles handed to AdamW by default
ADAMW_ROLES = ("embed", "head", "norm_gain", "bias", "vector")


def _step_without_global_hooks(opt: torch.optim.Optimizer) -> None:
    """``opt.step()`` with its own step hooks but not the global ones
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``): those ran once, around
    DualizeAdamW.step; through the inner optimizers they fired three times per step."""
    step = type(opt).step
    if not getattr(step, "hooked", False):  # not wrapped by torch's hook runner: nothing global to skip
        step(opt)
        return
    args: tuple = (opt,)
    kwargs: dict = {}
    for hook in opt._optimizer_step_pre_hooks.values():
        result = hook(opt, args, kwargs)
        if result is not None:  # torch's contract: a pre-hook may return new (args, kwargs)
            args, kwargs = result
    step.__wrapped__(*args, **kwargs)
    for hook in opt._optimizer_step_post_hooks.values():
        hook(opt, args, kwargs)


def _refuse_sparse(atoms) -> None:
    """TypeError for an nn.Embedding/EmbeddingBag(sparse=True) weight: its gradient is sparse, which
    neither inner optimizer supports (the first step failed in torch with NotImplementedError)."""
    for a in atoms:
        owner = getattr(a, "_owner", None)
        if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) and owner.sparse and a.weight.requires_grad:
            raise TypeError(f"DualizeAdamW: {getattr(a, 'name', 'an embedding')} has sparse gradients "
                            "(sparse=True), which neither DualizeRetract nor AdamW supports: use sparse=False")


class _AtomSubset(Module):
    """The chosen atoms of a module with the module's own norm coefficients (for DualizeRetract)."""

    def __init__(self, atoms, coefficients):
        super().__init__()
        self.atom_views = nn.ModuleDict({getattr(a, "name", str(i)).replace(".", "/"): a for i, a in enumerate(atoms)})
        object.__setattr__(self, "_atoms", list(atoms))
        object.__setattr__(self, "_coefs", list(coefficients))

    def atoms(self):
        return list(self._atoms)

    def norm_coefficients(self):
        return list(self._coefs)

    def _coefficient_map(self):
        return dict(zip(self._atoms, self._coefs))

    mass = property(lambda self: sum(a.mass for a in self._atoms))
    sensitivity = property(lambda self: float("nan"))
    sharpness = property(lambda self: None)

    def forward(self, *a, **k):
        raise RuntimeError("_AtomSubset only carries atoms for an optimizer")


class _AdamWGroup(dict):
    """An AdamW param group that also answers to "momentum" (its beta1), as SGD's groups do: momentum
    schedulers (OneCycleLR, CyclicLR) set one key on every group of an optimizer, and DualizeRetract's
    groups have "momentum", so AdamW's beta1 follows the same key. Nothing extra is stored (the
    state dict stays a plain AdamW one)."""

    def __init__(self, group):
        super().__init__(group)
        if dict.__contains__(self, "momentum"):  # given to add_param_group: fold it into betas
            self["momentum"] = dict.pop(self, "momentum")

    def __getitem__(self, key):
        return self["betas"][0] if key == "momentum" else super().__getitem__(key)

    def __setitem__(self, key, value):
        if key == "momentum":
            key, value = "betas", (value, *super().__getitem__("betas")[1:])
        super().__setitem__(key, value)

    def __contains__(self, key):
        return key == "momentum" or super().__contains__(key)

    def get(self, key, default=None):
        """``group[key]`` if present (including "momentum"), else ``default``."""
        return self[key] if key in self else default


class DualizeAdamW(torch.optim.Optimizer):
    """DualizeAdamW(module, lr=0.1, adamw_lr=3e-3, adamw_roles=ADAMW_ROLES, momentum=0.95,
    nesterov=True, weight_decay=0.0, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.0,
    adamw_eps=1e-8, nonfinite="skip").

    ``module``: an adapted (or native) modula_mhc Module. Atoms whose role matches a glob in
    ``adamw_roles`` (or whose weight has fewer than 2 dims when "vector" is listed) go to AdamW at
    ``adamw_lr``; the others to DualizeRetract at ``lr`` with their modular-norm coefficients.
    ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``, ``add_param_group`` and the
    step/state-dict hooks cover both, as on a torch optimizer. Every group has "lr" and "momentum"
    (AdamW's: beta1), so LR and momentum schedulers (OneCycleLR, CyclicLR) drive both."""

    def __init__(self, module: Module, lr=0.1, adamw_lr=3e-3, adamw_roles=ADAMW_ROLES, momentum=0.95,
                 nesterov=True, weight_decay=0.0, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.0, adamw_eps=1e-8,
                 nonfinite="skip"):
        if not isinstance(module, Module):
            raise TypeError("DualizeAdamW: pass a modula_mhc Module (e.g. modula_mhc.adapt(model))")
        # "momentum" and no "betas": schedulers pick the key from the defaults and then set it on
        # every group; "betas" would land in DualizeRetract's groups, unread. The adamw_* entries
        # are what AdamW gets (also when add_param_group creates it).
        self.defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                             adamw_lr=adamw_lr, adamw_betas=tuple(adamw_betas),
                             adamw_weight_decay=adamw_weight_decay, adamw_eps=adamw_eps)
        self.nonfinite, self.skipped_steps = nonfinite, 0
        self._adamw_roles = tuple(adamw_roles)
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()  # step runs the step hooks, once per DualizeAdamW.step

        atoms, coefs = module.atoms(), module.norm_coefficients()
        _refuse_sparse(atoms)
        dual = [(a, c) for a, c in zip(atoms, coefs) if not self._to_adamw(a)]
        plain, seen = [], set()
        for a in atoms:
            if self._to_adamw(a) and id(a.weight) not in seen:
                seen.add(id(a.weight))
                plain.append(a.weight)
        self.dualize_retract = self.adamw = None
        if dual:
            subset = _AtomSubset([a for a, _ in dual], [c for _, c in dual])
            self.dualize_retract = self._new_dualize_retract(subset)
            object.__setattr__(self, "_subset", subset)  # keep the views' holder alive
        if plain:
            self.adamw = self._new_adamw(plain)

    def _to_adamw(self, atom) -> bool:
        r = atom.role or ""
        if any(fnmatch.fnmatch(r, g) for g in self._adamw_roles):
            return True
        return "vector" in self._adamw_roles and atom.weight.ndim < 2

    def _new_dualize_retract(self, params):
        d = self.defaults
        return DualizeRetract(params, lr=d["lr"], momentum=d["momentum"], nesterov=d["nesterov"],
                              weight_decay=d["weight_decay"], nonfinite=self.nonfinite)

    def _new_adamw(self, params):
        d = self.defaults
        opt = torch.optim.AdamW(params, lr=d["adamw_lr"], betas=d["adamw_betas"], eps=d["adamw_eps"],
                                weight_decay=d["adamw_weight_decay"])
        self._wrap_adamw_groups(opt)
        return opt

    @staticmethod
    def _wrap_adamw_groups(opt):
        if opt is not None:  # in place: AdamW keeps its own list
            opt.param_groups[:] = [g if isinstance(g, _AdamWGroup) else _AdamWGroup(g) for g in opt.param_groups]

    def _inner(self) -> dict:
        return {"dualize_retract": self.dualize_retract, "adamw": self.adamw}

    @property
    def _opts(self):
        return [o for o in self._inner().values() if o is not None]

    @property
    def param_groups(self):
        """Both optimizers' groups, DualizeRetract's first (the inner optimizers' own dicts)."""
        return [g for o in self._opts for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value):  # Optimizer internals may assign it; the groups live in the inner optimizers
        pass

    @property
    def state(self):
        """Both optimizers' per-parameter state, in one dict."""
        out = {}
        for o in self._opts:
            out.update(o.state)
        return out

    @state.setter
    def state(self, value):
        pass

    def add_param_group(self, param_group):
        """Add a group to the optimizer the constructor would give its parameters: weights of atoms
        (modula_mhc atoms or adapted views) outside ``adamw_roles`` to DualizeRetract (norm coefficient
        1: the module's coefficients are fixed at construction), every other parameter to AdamW
        ("momentum" there sets beta1). Missing hyperparameters come from that optimizer's defaults;
        a group mixing both kinds raises ValueError (add them as two groups)."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in params):
            raise ValueError("DualizeAdamW: some parameters appear in more than one parameter group")
        kinds = {self._is_dual(p) for p in params}
        if len(kinds) > 1:
            raise ValueError("DualizeAdamW.add_param_group: the group mixes matrices of DualizeRetract atoms "
                             "with AdamW parameters; add them as two groups")
        if kinds == {True}:
            if self.dualize_retract is None:
                self.dualize_retract = self._new_dualize_retract([group])
            else:
                self.dualize_retract.add_param_group(group)
        elif self.adamw is None:
            self.adamw = self._new_adamw([group])
        else:
            self.adamw.add_param_group(group)
            self._wrap_adamw_groups(self.adamw)

    def _is_dual(self, p) -> bool:
        ref = getattr(p, "_mm_atom", None)
        atom = ref() if isinstance(ref, weakref.ref) else None
        return atom is not None and not self._to_adamw(atom)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both optimizers (skipped as a whole on a non-finite gradient under "skip");
        returns closure()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one check over both optimizers: the whole step is skipped (or raises)
        if skip_nonfinite_step(self, lambda: all(bool(torch.isfinite(p.grad).all()) for g in self.param_groups
                                                 for p in g["params"] if p.grad is not None), stacklevel=3):
            return loss
        for o in self._opts:
            _step_without_global_hooks(o)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        """Zero (or, by default, drop) the gradients of both optimizers' parameters."""
        for o in self._opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """{"dualize_retract": …, "adamw": … (None for an optimizer without parameters),
        "skipped_steps": n}; the state-dict hooks run around it as on a torch optimizer."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = {name: o.state_dict() if o is not None else None for name, o in self._inner().items()}
        sd["skipped_steps"] = self.skipped_steps
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict):
        """Load what ``state_dict`` returned (a missing "skipped_steps" counts as 0); ValueError, with
        nothing loaded, when the two disagree on which inner optimizer exists or a saved buffer does
        not fit its parameter's shape (a state dict of another model)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        inner = self._inner()
        for name, o in inner.items():  # check both before changing either
            if (state_dict.get(name) is None) != (o is None):
                raise ValueError(f"DualizeAdamW.load_state_dict: {name} is "
                                 f"{'missing' if o is not None else 'present'} in the state dict but "
                                 f"{'present' if o is not None else 'missing'} here")
            if o is not None:  # saved buffers of other shapes (another model) fail here, before any load
                check_state_shapes("DualizeAdamW", state_dict[name], [p for g in o.param_groups for p in g["params"]])
        for name, o in inner.items():
            if o is not None:
                o.load_state_dict(state_dict[name])
        self._wrap_adamw_groups(self.adamw)  # torch replaces the groups with the loaded plain dicts
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def diagnostics(self) -> dict:
        """DualizeRetract's diagnostics (``{}`` when it has no parameters)."""
        return self.dualize_retract.diagnostics() if self.dualize_retract is not None else {}

    def __repr__(self):
        n_dual = sum(len(g["params"]) for g in self.dualize_retract.param_groups) if self.dualize_retract else 0
        n_adam = sum(len(g["params"]) for g in self.adamw.param_groups) if self.adamw else 0
        return f"DualizeAdamW({n_dual} parameters dualize-retract, {n_adam} AdamW)"
