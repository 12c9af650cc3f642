"""modula_mhc: modular-norm networks, manifold Muon and manifold-constrained hyper-connections.

    import modula_mhc as mm
    from modula_mhc import atoms, bonds, compounds
    net = atoms.Linear(64, 10) @ bonds.ReLU() @ atoms.Linear(784, 64)
    net.mass, net.sensitivity, net.sharpness, net.norm()
"""
# ruff: noqa: I001  (import order matters here: atoms need manifolds)
from . import kernels, manifolds  # noqa: F401
from . import atoms, bonds, compounds, optim  # noqa: F401
from . import claims  # noqa: F401  (certify / check_claims: are the declared constants valid here?)
from .algebra import Compose, Parallel, Scale, Sum, repeat, residual  # noqa: F401
from .module import Atom, Bond, Module, Sharpness  # noqa: F401
from . import adapt  # noqa: F401  (callable: modula_mhc.adapt(model, manifolds) — bring your own model)

__version__ = "0.1.0"


def __getattr__(name):
    """``modula_mhc.symbolic`` is loaded on first use: it needs sympy, whose import takes ~0.4 s."""
    if name == "symbolic":
        import importlib
        return importlib.import_module(f"{__name__}.symbolic")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
