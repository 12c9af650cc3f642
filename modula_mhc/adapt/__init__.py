"""Bring your own model: dualize-then-retract, modular norms and (m)HC for any ``torch.nn.Module``.

    import modula_mhc as mm
    net = mm.adapt(model, "hetero")              # atom views over the model's own parameters
    opt = mm.optim.DualizeRetract(net, lr=0.1)   # trains model; net.describe() shows what was inferred

One idea per module: ``roles`` (what each parameter is), ``views`` (atom views over borrowed
parameters), ``structure`` (the module tree read as a native compound), ``describe`` (the table),
``optim`` (DualizeRetract with an inner AdamW for plain parameters), ``hyper`` (any nn.Module as
the branch of a hyper-connection), ``connections`` (HC/mHC around such a branch). Guide: docs/adapt.md.
"""
from .adapted import Adapted, adapt
from .connections import expand_streams, hyper_connections, reduce_streams
from .hyper import HyperBranch
from .optim import DualizeAdamW
from .roles import infer as infer_roles
from .structure import DEFAULT_MASSES

__all__ = [
    "DEFAULT_MASSES",
    "Adapted",
    "DualizeAdamW",
    "HyperBranch",
    "adapt",
    "expand_streams",
    "hyper_connections",
    "infer_roles",
    "reduce_streams",
]


class _CallableModule(type(__import__("sys"))):  # type: ignore[misc]
    """``modula_mhc.adapt`` is this package and also the function: ``mm.adapt(model, "hetero")``
    calls :func:`adapted.adapt`, while ``mm.adapt.DualizeAdamW`` etc. stay reachable."""

    def __call__(self, model, manifolds="muon", **options):
        return adapt(model, manifolds, **options)


__import__("sys").modules[__name__].__class__ = _CallableModule
