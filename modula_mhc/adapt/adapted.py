"""``adapt(model, manifolds)``: an existing nn.Module as a modula_mhc Module (atom views over its
own parameters, a recovered or defaulted structure, manifolds from a preset or rules)."""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from .. import manifolds as _manifolds
from .. import scalars as S
from ..module import Module, Sharpness
from ..optim.presets import PRESETS, manifold_for_role
from . import describe as _describe
from .roles import hf_conv1d_type, infer
from .structure import build_branch_shadow, build_shadow
from .views import EmbedView, GainView, MatrixView, TiedEmbedView, VectorView

__all__ = ["Adapted", "adapt"]

#: roles read as "a matrix without a preset role" (they take the preset's third manifold)
_GENERIC_MATRIX_ROLES = ("conv", "matrix")


class Adapted(Module):
    """An existing ``nn.Module`` seen as a modula_mhc Module. Build it with :func:`adapt`.

    ``adapted(*args, **kwargs)`` runs ``adapted.model`` unchanged; ``parameters()`` are the model's
    own tensors; ``atoms()`` are the atom views (one per distinct parameter, in
    ``model.parameters()`` order), so ``DualizeRetract(adapted)``, ``norm()``, ``dualize()`` and
    ``retract()`` work as on native modules. Attributes not found here are looked up on the model
    (``adapted.config``, ``adapted.save_pretrained`` …)."""

    def __init__(self, model: nn.Module, views: list, shadow, placed: dict, summary: str, atoms=None):
        super().__init__()
        self.model = model
        self.atom_views = nn.ModuleDict({v.name.replace(".", "/"): v for v in views})
        object.__setattr__(self, "_views", list(atoms if atoms is not None else views))
        object.__setattr__(self, "_shadow", shadow)
        self.structure_summary = summary
        for v in views:  # (atoms of native modules inside the model describe themselves)
            v.structure = "recovered" if v.name in placed else "defaulted"
            if v.name in placed:
                v.note = placed[v.name] + (f"; {v.note}" if v.note else "")

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    # -- the Module protocol
    def atoms(self) -> list:
        return list(self._views)

    @property
    def recovered(self) -> bool:
        return self._shadow is not None

    @property
    def mass(self):
        if self._shadow is not None:
            return self._shadow.mass
        return sum((v.mass for v in self._views), 0.0)

    @property
    def sensitivity(self):
        """∞: no Lipschitz claim. A foreign model's norm layers, attention cores and activations are
        only stand-ins in the shadow, and an adversary exceeds the shadow's value on real models
        (``sensitivity_estimate`` keeps it for reading and for the modular norm)."""
        return math.inf

    @property
    def sensitivity_estimate(self):
        """The shadow compound's sensitivity when the structure was recovered (the model's residual
        read as the library's, norms and cores 1-sensitive): an estimate, not a bound; ∞ when defaulted."""
        return self._shadow.sensitivity if self._shadow is not None else math.inf

    @property
    def norm_sensitivity(self):
        # the ν an enclosing compound builds its norm coefficients with: the estimate, as native
        # attention builds its norm from a smaller constant than the one it certifies
        return self._shadow.norm_sensitivity if self._shadow is not None else math.inf

    @property
    def weight_gain(self):
        """∞: ‖J_w f·Δw‖ ≤ κ‖Δw‖_M is not derived for a foreign model (its inputs, norms and cores
        are not certified; the inherited κ = 1 was exceeded on the first model measured)."""
        return math.inf

    def sensitivity_text(self):
        s = S.to_number(self.sensitivity_estimate)
        return "∞ (not derived: structure defaulted)" if s == S.INF else f"{s:.4g} (estimate, from the recovered structure)"

    @property
    def sharpness(self):
        # not derived for a foreign model: its norms, cores and activations are only stand-ins here
        return Sharpness(S.INF, S.INF, S.INF)

    def _coefficient_map(self):
        if self._shadow is None:
            out = {}
            for _, isl in _islands(self.model):  # native modules inside keep their own coefficients
                out.update(isl._coefficient_map())
            return {v: out.get(v, 1.0) for v in self._views if not S.is_zero(v.mass)}
        cmap = self._shadow._coefficient_map()
        return {v: cmap.get(v, 1.0) for v in self._views if not S.is_zero(v.mass)}

    # -- reading it
    def describe(self, file=None) -> str:
        """Print (to ``file``, default stdout; None-returning print skipped when file=False) and return
        the table: parameter, shape, role, manifold, mass, norm coefficient, structure."""
        text = _describe.table(self)
        if file is not False:
            print(text, file=file)
        return text

    def name_of(self, atom) -> str:
        """The model's name for an atom's parameter."""
        name = getattr(self, "_names", {}).get(id(atom))
        if name is not None:
            return name
        for n, p in self.model.named_parameters():
            if p is atom.weight:
                return n
        return type(atom).__name__



def _tied_to_head(model, info) -> bool:
    """True when an embedding's tensor is also the weight of a Linear (or HF Conv1D): a tied head."""
    heads = (nn.Linear,) + ((hf_conv1d_type(),) if hf_conv1d_type() else ())
    for name in info.tied:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        try:
            if isinstance(model.get_submodule(owner), heads):
                return True
        except AttributeError:
            continue
    return False


def _islands(model):
    """(name, module) of the top-most native modula_mhc Modules inside a foreign model."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Module) and not any(name.startswith(n + ".") or n == "" for n, _ in out):
            out.append((name, m))
    return out


def _atom_of_param(island, p):
    for a in island.atoms():
        if a.weight is p:
            return a
    raise ValueError(f"adapt: a parameter of shape {tuple(p.shape)} inside a modula_mhc module belongs to no atom")


def _choose(rules, view):
    for pattern, m in rules:
        if view.role == pattern or fnmatch.fnmatch(view.name, pattern) or fnmatch.fnmatch(view.role, pattern):
            return m
    return None


def _resolve_manifolds(manifolds, views):
    """{view: manifold} for the matrix views (other views stay Euclidean)."""
    out = {}
    if isinstance(manifolds, str):
        key = manifolds.lower()
        if key not in PRESETS:
            raise ValueError(f"adapt: unknown manifold preset {manifolds!r}; known: {', '.join(sorted(PRESETS))} "
                             "(or a dict {name glob or role: manifold})")
        for v in views:
            if isinstance(v, MatrixView):
                role = None if v.role in _GENERIC_MATRIX_ROLES else v.role
                choice = manifold_for_role(key, role)
                out[v] = _manifolds.get(choice or "euclidean")
        return out
    if isinstance(manifolds, dict):
        rules = [(str(k), _manifolds.get(m)) for k, m in manifolds.items()]
        for v in views:
            m = _choose(rules, v)
            if m is not None:
                if not isinstance(v, MatrixView) and m.name != "euclidean":
                    raise ValueError(f"adapt: {v.name} ({v.role}, shape {tuple(v.shape)}) cannot live on "
                                     f"{m.name}: only matrices take manifolds other than euclidean")
                out[v] = m
            elif isinstance(v, MatrixView):
                out[v] = _manifolds.get("euclidean")
        return out
    raise TypeError(f"adapt: manifolds must be a preset name or a dict, got {type(manifolds).__name__}")


def adapt(model: nn.Module, manifolds="muon", *, roles=None, split_heads=False, structure="auto",
          masses=None, retract=True, tied_head="embed") -> Adapted:
    """Wrap an existing ``nn.Module`` as a modula_mhc Module, without editing its code.

    ``manifolds``: a preset — "muon" (everything Euclidean: Muon), "hetero" (Stiefel attention,
    DGram MLP), "hetero-inv", "all-stiefel", "all-dgram" — or a dict {parameter-name glob or role:
    manifold}, first match wins, unmatched matrices Euclidean. Embeddings, the head and 1-D
    parameters stay Euclidean under every preset (as in ``compounds.GPT``).
    ``roles``: {parameter-name glob: role} overriding what was inferred (e.g. {"*.wo.weight":
    "attn_o"}). ``split_heads``: also split fused and separate q/k/v projections into heads when
    the model says how many (``num_heads``/``n_head`` on the attention module or its config).
    ``structure``: "auto" (recover blocks where possible), "branch" (the model is one residual
    branch, e.g. norm + attention: how ``hyper_connections`` reads its branch) or "default"
    (coefficient 1 for every parameter). ``masses``: overrides of ``structure.DEFAULT_MASSES``. ``retract``: put the
    weights of non-Euclidean matrices on their manifold now (in place; Euclidean weights keep the
    model's initialisation). ``tied_head``: the norm of an embedding that is also the head (GPT-2):
    "embed" (default, the embedding's max row RMS) or "max" (the max of that and the head's RMS→RMS
    norm, ``TiedEmbedView``; measured worse at these sizes, docs/results.md).

    Returns an :class:`Adapted` whose ``describe()`` prints what was inferred.
    """
    _check_options(model, structure, tied_head)
    infos = _parameter_infos(model)
    role_rules = list((roles or {}).items())
    views, by_id, ordered = [], {}, []
    for info in infos:
        p = info.module.get_parameter(info.param_name)
        if info.kind == "island":  # a native modula_mhc module inside the model: its own atoms
            atom = _atom_of_param(info.module, p)
            by_id[id(p)] = atom
            ordered.append(atom)
            continue
        _override_role(info, p, role_rules)
        v = _view_of(model, info, tied_head, split_heads)
        views.append(v)
        ordered.append(v)
        by_id[id(p)] = v
    shadow, placed, summary = _structure(structure, model, infos, by_id, masses)
    _place_on_manifolds(_resolve_manifolds(manifolds, views), retract)
    _freeze(views)
    adapted = Adapted(model, views, shadow, placed, summary, atoms=ordered)
    object.__setattr__(adapted, "_names", {id(by_id[id(i.module.get_parameter(i.param_name))]): i.name for i in infos})
    for v in views:  # the last adapter of a parameter owns its tag
        v._tag()
    return adapted


def _place_on_manifolds(chosen, retract):
    """Give each view its manifold and (``retract``) project its weight onto it once. A frozen
    weight (requires_grad=False) stays Euclidean and untouched: adapt must not rewrite what the
    user froze (a pretrained backbone), and nothing would ever step it back."""
    live = {v: m for v, m in chosen.items() if v.weight.requires_grad}
    for v, m in live.items():  # all checks first: a refused model is left as it was
        v.check_start(m)
    for v, m in live.items():
        v.manifold = v._check_manifold(m)
        if retract and m.name != "euclidean":
            with torch.no_grad():
                v.project_()


def _freeze(views):
    """Frozen weights get mass 0, i.e. norm coefficient ∞ and step target 0, as a native atom of
    mass 0: they take no share of the update and do not count in the modular norm."""
    for v in views:
        if not v.weight.requires_grad:
            v.mass = 0.0
            v.note = "frozen (requires_grad=False): mass 0" + (f"; {v.note}" if v.note else "")


def _check_parameters(model):
    """Clear errors for parameters no view can read: lazy (uninitialised), complex, empty."""
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(f"adapt: {name} is uninitialized (a lazy module): run one forward pass first")
        if p.is_complex():
            raise TypeError(f"adapt: {name} is complex ({p.dtype}); the atom norms are defined for real weights")
        if p.numel() == 0:
            raise ValueError(f"adapt: {name} has shape {tuple(p.shape)} and no elements; no norm is defined on it")


def _check_options(model, structure, tied_head):
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, Module):
        raise TypeError("adapt: this is already a modula_mhc Module; use it directly")
    _check_parameters(model)
    if tied_head not in ("embed", "max"):
        raise ValueError(f"adapt: tied_head must be 'embed' or 'max', got {tied_head!r}")
    if structure not in ("auto", "default", "branch"):
        raise ValueError(f"adapt: structure must be 'auto', 'default' or 'branch', got {structure!r}")


def _parameter_infos(model) -> list:
    """The inferred roles of the model's parameters; those of native modula_mhc modules inside it
    ("islands") become kind "island" and keep their atoms' roles."""
    islands = _islands(model)
    island_of = {id(p): (name, isl) for name, isl in islands for p in isl.parameters()}
    infos = []
    for info in infer(model):
        p = info.module.get_parameter(info.param_name)
        if id(p) in island_of:
            name, isl = island_of[id(p)]
            rel = next(n for n, q in isl.named_parameters() if q is p)
            info.kind, info.module_name, info.module, info.param_name = "island", name, isl, rel
            info.role = getattr(_atom_of_param(isl, p), "role", None) or "native"
        infos.append(info)
    if not infos:
        raise ValueError("adapt: the model has no parameters")
    return infos


def _override_role(info, p, role_rules):
    """The first ``roles`` glob matching the parameter's name sets its role (a 2-D "embed" also
    makes it an embedding)."""
    for pattern, role in role_rules:
        if fnmatch.fnmatch(info.name, pattern):
            info.role = role
            if role == "embed" and info.kind != "embed" and p.ndim == 2:
                info.kind = "embed"
            return


def _view_of(model, info, tied_head, split_heads):
    """The atom view of one parameter, by its kind."""
    if info.kind == "embed":
        cls = TiedEmbedView if (tied_head == "max" and _tied_to_head(model, info)) else EmbedView
        v = cls(info.module, info.param_name, info.name, info.role)
    elif info.kind == "matrix":
        seg = info.segments if info.role == "attn_qkv" and info.groups == 1 else None
        hd = info.head_dim if (split_heads and info.role.startswith("attn") and info.role != "attn_o") else None
        v = MatrixView(info.module, info.param_name, info.name, info.role, layout=info.layout, segments=seg,
                       head_dim=hd, groups=info.groups)
    elif info.kind == "gain":
        v = GainView(info.module, info.param_name, info.name, info.role)
    else:
        v = VectorView(info.module, info.param_name, info.name, info.role)
    notes = [info.note] if info.note else []
    if info.tied:
        notes.append("tied with " + ", ".join(info.tied))
    v.note = "; ".join(notes)
    return v


def _structure(structure, model, infos, by_id, masses):
    """(shadow compound, placed views, summary) for the chosen ``structure``."""
    if structure == "auto":
        return build_shadow(model, infos, by_id, masses)
    if structure == "branch":
        return build_branch_shadow(model, infos, by_id, masses)
    return None, {}, "defaulted (structure='default')"
