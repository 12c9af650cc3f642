"""Structure recovery: read the module tree of an existing model as a native modula_mhc compound.

The model's own forward pass is never touched. Recovery builds a *shadow* compound out of the
atom views and weightless stand-in bonds, with the library's own algebra (``Compose``, ``Sum``,
``Parallel``, ``Scale``, ``residual``), so the mass, sensitivity and norm coefficients come from
the same rules as for ``compounds.GPT``:

* **Blocks**: the ``nn.ModuleList`` / ``nn.Sequential`` containers whose items all share one
  class and hold matrices (GPT-2's ``h``, Llama's ``layers``, a ResNet's ``layer1..4``); L = the
  number of blocks in all of them.
* **Transformer block** (an attention child and an MLP child): two residual branches, each read
  as the library's residual ``(1 − 1/(2L))·x + 1/(2L)·branch(x)`` — the model's ``x + branch(x)``
  differs from it by a rescaling of the residual stream, which the pre-norm branches do not see.
  Attention branch: norm → (q, k, v) in parallel (or the fused projection) → (1/k)·core → o;
  MLP branch: norm → the input projections in parallel → (1/k)·activation → the output projection.
  Norm layers are assigned to the branch they feed by name (ln_1/input_layernorm → attention,
  ln_2/post_attention_layernorm → MLP), else by order.
* **Other blocks** (e.g. a ResNet BasicBlock): ``Sum(Scale(1 − 1/L, shortcut), Scale(1/L, branch))``,
  the shortcut being the identity or the child named downsample/shortcut/skip, the branch the
  remaining units composed in registration order.
* **Outside the blocks**: the units before the first block (embeddings summed, stem layers) and
  after the last (final norm, head), composed in order; a tied head re-uses the embedding's view.
* **Units**: a matrix with its bias is ``Sum(matrix, bias)`` (native ``Linear(bias=True)``), a norm
  layer is ``Sum(gain, bias) ∘ norm``.

Masses follow ``compounds.GPT``: embeddings 1 in all, head 1, all blocks together 5 (split by
projection count; a fused QKV weight counts 3), any other matrix 1, and a 1-D parameter
``vector_mass`` = 0.1 of a projection's (so gains and biases take small, Adam-sized steps).

When no block container is found the structure is *defaulted*: every parameter gets norm
coefficient 1 (it steps ``lr`` in its own natural norm, the per-matrix rule of Muon).
"""
from __future__ import annotations

import re

from torch import nn

from ..algebra import Compose, Identity, Parallel, Scale, Sum, residual
from ..module import Bond
from .roles import _ATTN_CONTAINER, _MLP_CONTAINER, hf_conv1d_type, is_norm_module
from .views import EmbedView, MatrixView

__all__ = ["DEFAULT_MASSES", "build_branch_shadow", "build_shadow", "find_blocks"]

#: mass rules (see the module docstring); override with adapt(..., masses={...})
DEFAULT_MASSES = {"embed": 1.0, "head": 1.0, "blocks": 5.0, "matrix": 1.0, "vector": 0.1}

_SHORTCUT = re.compile(r"^(downsample|shortcut|skip|proj_shortcut|residual_proj|identity_proj)$")


class _Op(Bond):
    """A weightless stand-in (normalisation, attention core, activation) in the shadow compound."""

    def __init__(self, what: str, sensitivity: float = 1.0):
        super().__init__()
        self.what = what
        self._sensitivity = sensitivity

    def forward(self, x):
        raise RuntimeError("the shadow compound of an adapted model only carries constants")

    def extra_repr(self):
        return self.what


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every item of the block containers, in order (see the module docstring)."""
    conv1d = hf_conv1d_type()
    mat_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention) + ((conv1d,) if conv1d else ())

    def has_matrix(m):
        return any(isinstance(s, mat_types) for s in m.modules())

    found: list[tuple[str, nn.Module]] = []
    prefixes: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in prefixes):
            continue
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1:
            items = list(mod)
            if len({type(m) for m in items}) == 1 and not isinstance(items[0], mat_types) \
                    and all(has_matrix(m) for m in items) and len(list(items[0].children())) > 0:
                for i, m in enumerate(items):
                    found.append((f"{name}.{i}" if name else str(i), m))
                prefixes.append(name + "." if name else "")
    return found


class _Builder:
    def __init__(self, infos, views, masses):
        self.views = views                     # id(param) -> view
        self.masses = masses
        self.by_module = {}                    # owner module name -> [info]
        for info in infos:
            self.by_module.setdefault(info.module_name, []).append(info)

    # -- units
    def unit(self, infos):
        """The shadow of one owner module's parameters (matrix [+ bias], norm, embed, vector)."""
        mats = [i for i in infos if i.kind in ("matrix", "embed")]
        gains = [i for i in infos if i.kind == "gain"]
        rest = [i for i in infos if i.kind == "vector"]
        if infos[0].kind == "island":  # a native modula_mhc module inside the model: itself
            return infos[0].module
        v = lambda i: self.views[id(i.module.get_parameter(i.param_name))]
        if gains or (rest and not mats and is_norm_module(infos[0].module)):
            parts = [v(i) for i in gains + rest]
            core = parts[0] if len(parts) == 1 else Sum(*parts)
            return Compose(_Op("norm"), core)
        if mats:
            parts = [v(i) for i in mats + rest]
            return parts[0] if len(parts) == 1 else Sum(*parts)
        parts = [v(i) for i in rest]
        return parts[0] if len(parts) == 1 else Sum(*parts)

    def units_under(self, prefix, infos_in_order):
        """[(child name, owner name, unit)] for the owners under ``prefix``, in parameter order."""
        out, done = [], set()
        for info in infos_in_order:
            m = info.module_name
            if m in done or not (m == prefix or m.startswith(prefix + ".") or prefix == ""):
                continue
            done.add(m)
            rel = m[len(prefix) + 1:] if prefix and m != prefix else m
            child = rel.split(".")[0] if rel else ""
            out.append((child, m, self.unit(self.by_module[m])))
        return out

    # -- blocks
    def block(self, name, infos_in_order, depth):
        units = self.units_under(name, infos_in_order)
        if units and all(self.by_module[o][0].kind == "island" for _, o, _ in units):
            return Compose(*[u for _, _, u in units]), "block of native modules"
        def kind_of(c, o):
            infos = self.by_module[o]
            if infos[0].kind == "island" or is_norm_module(infos[0].module):
                return None
            role = next((i.role for i in infos if i.kind == "matrix"), "") or ""
            if role.startswith("attn") or _ATTN_CONTAINER.search(c.lower()):
                return "attn"
            if role.startswith("mlp") or _MLP_CONTAINER.search(c.lower()):
                return "mlp"
            return None
        kinds = [kind_of(c, o) for c, o, _ in units]
        attn, mlp = "attn" in kinds, "mlp" in kinds
        if attn and mlp:
            return self.transformer_block(units, depth), "transformer block"
        shortcut = [u for c, _, u in units if _SHORTCUT.match(c.lower())]
        branch = [u for c, _, u in units if not _SHORTCUT.match(c.lower())]
        if not branch:
            return None, "no weights"
        branch_m = Compose(*self._with_activations(branch))
        short = Compose(*shortcut) if shortcut else Identity()
        return Sum(Scale(1.0 - 1.0 / depth, short), Scale(1.0 / depth, branch_m)), "residual block"

    @staticmethod
    def _with_activations(units):
        out = []
        for u in units:
            if out:
                out.append(_Op("activation"))
            out.append(u)
        return out

    def transformer_block(self, units, depth):
        attn_in, attn_out, attn_other, mlp_in, mlp_out, mlp_other = [], [], [], [], [], []
        norms = []
        for child, owner, u in units:
            c = child.lower()
            infos = self.by_module[owner]
            role = next((i.role for i in infos if i.kind == "matrix"), None)
            if is_norm_module(infos[0].module) and infos[0].kind != "island":
                norms.append((c, u))
            elif (role or "").startswith("attn") or (_ATTN_CONTAINER.search(c) and not (role or "").startswith("mlp")):
                (attn_out if role == "attn_o" else attn_in if role and role.startswith("attn") else attn_other).append(u)
            elif (role or "").startswith("mlp") or _MLP_CONTAINER.search(c):
                (mlp_out if role == "mlp_out" else mlp_in if role == "mlp_in" else mlp_other).append(u)
            else:  # anything else in the block (a gate, a scale): inside the attention branch
                attn_other.append(u)
        attn_norm, mlp_norm = [], []
        if depth is None:  # one branch alone: its norms are its own
            (attn_norm if (attn_in or attn_out) else mlp_norm).extend(u for _, u in norms)
            norms = []
        for i, (c, u) in enumerate(norms):
            if re.search(r"post|2|ffn|mlp|ff_", c):
                mlp_norm.append(u)
            elif re.search(r"input|1|attn|attention|pre", c):
                attn_norm.append(u)
            else:
                (attn_norm if i == 0 else mlp_norm).append(u)

        def branch(norm, ins, others, core_name, outs):
            layers = list(norm)
            k = max(1, sum(self._count(u) for u in ins))
            if ins:
                layers.append(ins[0] if len(ins) == 1 else Parallel(*ins))
            layers += others
            layers.append(Scale(1.0 / k, _Op(core_name)))
            layers += outs
            return Compose(*layers)

        attn_b = branch(attn_norm, attn_in, attn_other, "attention core", attn_out)
        mlp_b = branch(mlp_norm, mlp_in, mlp_other, "activation", mlp_out)
        if depth is None:  # one branch alone (a hyper-connected branch): whichever has weights
            return attn_b if (attn_in or attn_out) else mlp_b
        return Compose(residual(attn_b, 2 * depth), residual(mlp_b, 2 * depth))

    def _count(self, unit):
        """Projections a unit stands for (a fused view counts its segments)."""
        for a in unit.atoms() if not isinstance(unit, MatrixView) else [unit]:
            if isinstance(a, MatrixView):
                return len(a.segments)
        return 1


def _set_masses(atoms, total, vector_ratio, keep=frozenset()):
    """Give matrix-like atoms mass ∝ their projection count and 1-D atoms ``vector_ratio`` of one,
    scaled so that they sum to ``total`` (atoms in ``keep``, of native modules, keep their ratios)."""
    raw = {}
    for a in atoms:
        if a in keep:
            raw[a] = float(a.mass)
        elif isinstance(a, MatrixView):
            raw[a] = float(len(a.segments))
        elif isinstance(a, EmbedView):
            raw[a] = 1.0
        else:
            raw[a] = vector_ratio
    s = sum(raw.values())
    for a, r in raw.items():
        a.mass = total * r / s if s else 0.0


def build_shadow(model, infos, views, masses=None):
    """(shadow compound or None, {param name: how it was placed}, summary string)."""
    masses = dict(DEFAULT_MASSES, **(masses or {}))
    blocks = find_blocks(model)
    b = _Builder(infos, views, masses)
    if not blocks and isinstance(model, nn.Sequential) and not any(i.kind == "island" for i in infos):
        return _sequential_shadow(b, infos, masses)
    if not blocks:
        return None, {}, "defaulted: no block container (ModuleList/Sequential of one block class) found"
    depth = len(blocks)
    seq, block_of_info = _occurrences(model, infos, [n for n, _ in blocks])
    layers, placed, block_atoms = _place(seq, b, infos, views, block_of_info, depth)
    _set_model_masses(infos, views, block_atoms, masses)
    kinds = sorted({k.split(" block")[0] for k in placed.values() if " block" in k and not k.startswith(("before", "after"))})
    n_pre = sum(1 for k in placed.values() if k.startswith("before"))
    n_post = sum(1 for k in placed.values() if k.startswith("after"))
    return Compose(*layers), placed, (f"structure recovered: {depth} {'/'.join(kinds)} blocks, {n_pre} parameters "
                                      f"before them, {n_post} after")


def _sequential_shadow(b, infos, masses):
    """A plain nn.Sequential: its units in order (registration order is execution order here)."""
    units = [u for _, _, u in b.units_under("", list(infos))]
    shadow = Compose(*b._with_activations(units))
    for v in dict.fromkeys(shadow.atoms()):
        v.mass = masses["matrix"] if v.weight.ndim >= 2 else masses["vector"] * masses["matrix"]
    return shadow, {i.name: "sequential" for i in infos}, "structure recovered: nn.Sequential"


def _occurrences(model, infos, block_names):
    """The model's top-level sequence: ("block", name) once per block and ("unit", module name,
    info) per module outside the blocks, in parameter order (a tied parameter appears at each
    place it is used); and {param name: its block}."""
    def in_block(module_name):
        return next((n for n in block_names if module_name == n or module_name.startswith(n + ".")), None)

    seq, seen_blocks, seen_units = [], set(), set()
    block_of_info, aliases = {}, {}
    by_id = {id(i.module.get_parameter(i.param_name)): i for i in infos}
    for full, p in model.named_parameters(remove_duplicate=False):
        info = by_id[id(p)]
        mname = info.module_name if info.kind == "island" else (full.rsplit(".", 1)[0] if "." in full else "")
        pos = in_block(mname)
        if pos is not None:
            # a block object listed twice (shared weights) is the first one used again: its
            # parameters belong to the first name, and each use is a layer of the shadow
            src = aliases.setdefault(pos, block_of_info.setdefault(info.name, pos))
            if pos not in seen_blocks:
                seen_blocks.add(pos)
                seq.append(("block", src))
            continue
        key = (mname, id(info.module))
        if key not in seen_units:
            seen_units.add(key)
            seq.append(("unit", mname, info))
    return seq, block_of_info


def _place(seq, b, infos, views, block_of_info, depth):
    """The shadow's layers in order (embeddings summed first, then blocks and the units around
    them), how each parameter was placed, and the atoms of the blocks."""
    placed, layers, embeds, block_atoms = {}, [], [], []
    pre = True
    for item in seq:
        if item[0] == "block":
            pre = False
            blk = item[1]
            mine = [i for i in infos if block_of_info.get(i.name) == blk]
            shadow, kind = b.block(blk, mine, depth)
            if shadow is not None:
                block_atoms += shadow.atoms()
                layers.append(shadow)
                placed.update((i.name, f"{kind} {blk} (L={depth})") for i in mine)
            continue
        _, mname, info = item
        owner_infos = [i for i in infos if i.module_name == info.module_name] if mname == info.module_name else [info]
        v = views.get(id(info.module.get_parameter(info.param_name)))
        if isinstance(v, EmbedView) and mname != info.module_name:  # a tied head re-using the embedding
            layers.append(v)
            placed[info.name] = placed.get(info.name, "embedding") + " + tied head"
            continue
        unit = b.unit(owner_infos)
        if pre and all(isinstance(a, EmbedView) for a in unit.atoms()):
            embeds.append(unit)
        else:
            if embeds and not layers:
                layers.append(embeds[0] if len(embeds) == 1 else Sum(*embeds))
                embeds = []
            layers.append(unit)
        placed.update((i.name, "before the blocks" if pre else "after the blocks") for i in owner_infos)
    if embeds:
        layers.insert(0, embeds[0] if len(embeds) == 1 else Sum(*embeds))
    return layers, placed, block_atoms


def _set_model_masses(infos, views, block_atoms, masses):
    """Blocks together masses["blocks"]; embeddings masses["embed"]; heads masses["head"]; other
    matrices masses["matrix"] each; 1-D parameters masses["vector"] of a matrix (native modules
    inside the model keep their atoms' ratios)."""
    island_atoms = {a for i in infos if i.kind == "island" for a in i.module.atoms()}
    _set_masses(list(dict.fromkeys(block_atoms)), masses["blocks"], masses["vector"], keep=island_atoms)
    views = {k: v for k, v in views.items() if v not in island_atoms}
    emb = [v for v in views.values() if isinstance(v, EmbedView)]
    for v in emb:
        v.mass = masses["embed"] / len(emb)
    others = [v for v in views.values() if v not in set(block_atoms) and v not in set(emb)]
    heads = [v for v in others if v.role == "head"]
    for v in others:
        if v.role == "head":
            v.mass = masses["head"] / len(heads)
        elif v.weight.ndim >= 2:
            v.mass = masses["matrix"]
        else:
            v.mass = masses["vector"] * masses["matrix"]


def build_branch_shadow(model, infos, views, masses=None):
    """The shadow of one residual *branch* (e.g. ``[ln_1, attn]`` handed to ``hyper_connections``):
    norm → input projections → (1/k)·core → output projection, as one branch of a transformer
    block; any other branch: its units composed in order. Masses: one per projection, 1-D
    parameters ``vector`` of one."""
    masses = dict(DEFAULT_MASSES, **(masses or {}))
    if any(i.kind == "island" for i in infos):
        return None, {}, "defaulted: the branch holds native modula_mhc modules"
    b = _Builder(infos, views, masses)
    units = b.units_under("", list(infos))
    roles = {i.role for i in infos}
    if any(r.startswith(("attn", "mlp")) for r in roles):
        shadow = b.transformer_block(units, None)
        kind = "attention branch" if any(r.startswith("attn") for r in roles) else "MLP branch"
    else:
        shadow = Compose(*b._with_activations([u for _, _, u in units]))
        kind = "sequential branch"
    atoms = list(dict.fromkeys(shadow.atoms()))
    _set_masses(atoms, float(len([a for a in atoms if a.weight.ndim >= 2]) or 1), masses["vector"])
    placed = {i.name: kind for i in infos}
    return shadow, placed, f"structure recovered: {kind}"
