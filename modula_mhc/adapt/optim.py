"""DualizeAdamW: DualizeRetract for the matrices, an inner AdamW for the plain parameters (the Muon
habit: embeddings, head, gains, biases).

It is a small wrapper: the matrices go to an unchanged :class:`~modula_mhc.optim.DualizeRetract`
(with the norm coefficients of the whole adapted module), the rest to ``torch.optim.AdamW``.
``param_groups`` lists both optimizers' groups (DualizeRetract's first), so LR schedulers drive
both; each group keeps its own lr.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..module import Module
from ..optim.dualize_retract import DualizeRetract, skip_nonfinite_step

__all__ = ["ADAMW_ROLES", "DualizeAdamW"]

#: roles handed to AdamW by default
ADAMW_ROLES = ("embed", "head", "norm_gain", "bias", "vector")


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


class DualizeAdamW(torch.optim.Optimizer):
    """DualizeAdamW(module, lr=0.1, adamw_lr=3e-3, adamw_roles=ADAMW_ROLES, momentum=0.95,
    nesterov=True, weight_decay=0.0, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.0,
    adamw_eps=1e-8, nonfinite="skip").

    ``module``: an adapted (or native) modula_mhc Module. Atoms whose role matches a glob in
    ``adamw_roles`` (or whose weight has fewer than 2 dims when "vector" is listed) go to AdamW at
    ``adamw_lr``; the others to DualizeRetract at ``lr`` with their modular-norm coefficients.
    ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict`` cover both."""

    def __init__(self, module: Module, lr=0.1, adamw_lr=3e-3, adamw_roles=ADAMW_ROLES, momentum=0.95,
                 nesterov=True, weight_decay=0.0, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.0, adamw_eps=1e-8,
                 nonfinite="skip"):
        if not isinstance(module, Module):
            raise TypeError("DualizeAdamW: pass a modula_mhc Module (e.g. modula_mhc.adapt(model))")
        atoms, coefs = module.atoms(), module.norm_coefficients()
        roles = tuple(adamw_roles)

        def to_adamw(a):
            r = a.role or ""
            if any(fnmatch.fnmatch(r, g) for g in roles):
                return True
            return "vector" in roles and a.weight.ndim < 2

        dual = [(a, c) for a, c in zip(atoms, coefs) if not to_adamw(a)]
        plain, seen = [], set()
        for a in atoms:
            if to_adamw(a) and id(a.weight) not in seen:
                seen.add(id(a.weight))
                plain.append(a.weight)
        self.dualize_retract = None
        if dual:
            subset = _AtomSubset([a for a, _ in dual], [c for _, c in dual])
            self.dualize_retract = DualizeRetract(subset, lr=lr, momentum=momentum, nesterov=nesterov,
                                                  weight_decay=weight_decay, nonfinite=nonfinite)
            object.__setattr__(self, "_subset", subset)  # keep the views' holder alive
        self.adamw = torch.optim.AdamW(plain, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                                       weight_decay=adamw_weight_decay) if plain else None
        self._opts = [o for o in (self.dualize_retract, self.adamw) if o is not None]
        self.nonfinite, self.skipped_steps = nonfinite, 0
        # torch.optim.Optimizer's bookkeeping, without a param list of its own
        self.defaults = {"lr": lr}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        self._zero_grad_profile_name = "Optimizer.zero_grad#DualizeAdamW.zero_grad"

    @property
    def param_groups(self):
        return [g for o in self._opts for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value):  # Optimizer internals may assign it; the groups live in the inner optimizers
        pass

    @property
    def state(self):
        out = {}
        for o in self._opts:
            out.update(o.state)
        return out

    @state.setter
    def state(self, value):
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one check over both optimizers: the whole step is skipped (or raises)
        if skip_nonfinite_step(self, lambda: all(bool(torch.isfinite(p.grad).all()) for g in self.param_groups
                                                 for p in g["params"] if p.grad is not None), stacklevel=3):
            return loss
        for o in self._opts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for o in self._opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"dualize_retract": self.dualize_retract.state_dict() if self.dualize_retract else None,
                "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict):
        if self.dualize_retract is not None:
            self.dualize_retract.load_state_dict(state_dict["dualize_retract"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])

    def diagnostics(self) -> dict:
        return self.dualize_retract.diagnostics() if self.dualize_retract is not None else {}

    def __repr__(self):
        n_dual = sum(len(g["params"]) for g in self.dualize_retract.param_groups) if self.dualize_retract else 0
        n_adam = sum(len(g["params"]) for g in self.adamw.param_groups) if self.adamw else 0
        return f"DualizeAdamW({n_dual} parameters dualize-retract, {n_adam} AdamW)"
