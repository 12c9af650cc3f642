"""Role inference: what each parameter of an existing model is, from module types and names.

Roles (the ones the library's presets read): ``embed`` (nn.Embedding, nn.EmbeddingBag),
``attn_q``, ``attn_k``, ``attn_v``, ``attn_qkv`` (fused), ``attn_o``, ``mlp_in``, ``mlp_out``,
``head``, ``conv``, ``matrix`` (any other weight with ≥ 2 dims, read as nn.Linear's (out, in)),
``norm_gain``, ``bias`` (a norm layer's or a matrix's bias, and any parameter named ``*bias*``:
MultiheadAttention's bias_k/bias_v) and ``vector`` (every other parameter, including bare
tensors of ≥ 3 dims with a leading 1, which are added to activations: cls tokens, position tables).

``infer(model)`` returns one :class:`ParamInfo` per distinct parameter (tied weights appear once,
under their first name) in ``model.named_parameters()`` order.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ParamInfo", "hf_conv1d_type", "infer", "is_norm_module"]

# name patterns (matched against the last component of a module path, lower case)
_ATTN_CONTAINER = re.compile(r"(^|_)(attn|attention|self_attn|selfattention|mha|cross_attn)($|_)|attention$|attn$")
_MLP_CONTAINER = re.compile(r"(^|_)(mlp|ffn|ff|feed_forward|feedforward|ffw|mlp_block)($|_)|mlp$")
_Q = re.compile(r"^(q|q_proj|query|wq|to_q|q_lin)$")
_K = re.compile(r"^(k|k_proj|key|wk|to_k|k_lin)$")
_V = re.compile(r"^(v|v_proj|value|wv|to_v|v_lin)$")
_QKV = re.compile(r"^(c_attn|qkv|qkv_proj|wqkv|in_proj|query_key_value|to_qkv|qkv_lin|c_qkv)$")
_O = re.compile(r"^(o|o_proj|out_proj|c_proj|wo|to_out|dense|out_lin|proj|output|out)$")
_MLP_IN = re.compile(r"^(c_fc|fc1|fc_in|w1|w3|gate_proj|up_proj|gate_up_proj|dense_h_to_4h|wi|wi_0|wi_1|lin1|"
                     r"intermediate|up|gate|in_proj|fc)$")
_MLP_OUT = re.compile(r"^(c_proj|fc2|fc_out|w2|down_proj|dense_4h_to_h|wo|lin2|down|out_proj|proj|output)$")
_HEAD = re.compile(r"^(lm_head|head|classifier|score|fc_out|output_projection|out_head|logits)$")


def hf_conv1d_type():
    """transformers' Conv1D class (weight stored (in, out)), or None when transformers' module that
    defines it was never imported: no layer can then be one, and importing transformers only to
    check cost ~2 s in every process that builds a HyperConnections layer."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_norm_module(m: nn.Module) -> bool:
    """LayerNorm, GroupNorm, BatchNorm*, InstanceNorm*, RMSNorm and look-alikes (class name ends in
    Norm / Norm1d / Norm2d …, e.g. LlamaRMSNorm)."""
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)):
        return True
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return True
    return re.search(r"norm(\d?d)?$", type(m).__name__.lower()) is not None


_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: weights stored (out, in/groups, k…), or (in, out/groups, k…) for the transposed ones
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _CONV_TRANSPOSES


@dataclass
class ParamInfo:
    """What adapt knows about one parameter."""

    name: str                 # full name in the model
    module_name: str          # the owning module's path
    module: nn.Module         # the owner
    param_name: str           # attribute on the owner
    kind: str                 # matrix | embed | gain | vector
    role: str
    layout: str = "oi"        # for matrices: "oi" (torch) or "io" (HF Conv1D, ConvTranspose)
    segments: tuple | None = None
    groups: int = 1           # a grouped convolution's blocks
    head_dim: int | None = None
    heads: int | None = None
    tied: list = field(default_factory=list)  # other names of the same tensor
    note: str = ""            # said in describe() (e.g. a parametrization latent)


def _path_parts(module_name):
    return [p.lower() for p in module_name.split(".") if p]


def _in_container(parts, pattern, types=()):
    """True when an enclosing module's name (or class name, ``types``) matches ``pattern``."""
    return any(pattern.search(p) for p in parts[:-1]) or any(pattern.search(t) for t in types)


def class_pattern_attn(t):
    return "attention" in t or t.endswith("attn")


def _ancestor_types(modules_by_name, mname):
    """Lower-case class names of the modules enclosing ``mname`` (not the module itself)."""
    out, parts = [], mname.split(".") if mname else []
    for i in range(len(parts)):
        m = modules_by_name.get(".".join(parts[:i]))
        if m is not None:
            out.append(type(m).__name__.lower())
    return out


def _attention_heads(model: nn.Module, attn: nn.Module | None):
    """(heads, kv_heads, head_dim) from the attention module or the model's config (None if unknown)."""
    srcs = [attn, getattr(model, "config", None)]
    heads = kv = head_dim = None
    for s in srcs:
        if s is None:
            continue
        for a in ("num_heads", "n_head", "num_attention_heads", "n_heads", "heads"):
            v = getattr(s, a, None)
            if isinstance(v, int) and heads is None:
                heads = v
        for a in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):
            v = getattr(s, a, None)
            if isinstance(v, int) and kv is None:
                kv = v
        v = getattr(s, "head_dim", None)
        if isinstance(v, int) and head_dim is None:
            head_dim = v
    return heads, kv, head_dim


def _fused_segments(rows, model, attn, fan_in):
    """Row counts of (q, k, v) in a fused projection with ``rows`` outputs."""
    heads, kv, head_dim = _attention_heads(model, attn)
    if heads and kv and heads != kv:
        hd = head_dim or (fan_in // heads)
        if heads * hd + 2 * kv * hd == rows:
            return (heads * hd, kv * hd, kv * hd), hd, heads
    if rows % 3 == 0:
        hd = head_dim or (rows // 3 // heads if heads and (rows // 3) % heads == 0 else None)
        return (rows // 3,) * 3, hd, heads
    return None, head_dim, heads


def _matrix_shape(module, W, layout):
    """(rows, fan_in) of the matrix a weight acts as (all groups of a grouped convolution)."""
    groups = getattr(module, "groups", 1) if isinstance(module, _CONVS) else 1
    rows = groups * W.shape[1] if layout == "io" else W.shape[0]
    return rows, W.numel() // rows * groups


def infer(model: nn.Module) -> list[ParamInfo]:
    """One ParamInfo per distinct parameter, in ``named_parameters()`` order."""
    conv1d = hf_conv1d_type()
    owner_of: dict[int, tuple] = {}
    modules_by_name = dict(model.named_modules())
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owner_of.setdefault(id(p), (mname, mod, pname))
    head_name = _head_name(model, conv1d)
    seen: dict[int, ParamInfo] = {}
    out: list[ParamInfo] = []
    for full, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            seen[id(p)].tied.append(full)
            continue
        mname, mod, pname = owner_of[id(p)]
        info = ParamInfo(full, mname, mod, pname, kind="vector", role="vector")
        seen[id(p)] = info
        out.append(info)
        if is_latent(mod, pname):  # the layer's weight is a function of it, not it: a plain vector
            info.note = "parametrization latent"
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and pname == "weight":
            info.kind, info.role = "embed", "embed"
        elif p.ndim >= 2 and _added_not_applied(mod, pname, p):
            info.role = "bias" if "bias" in pname.lower() else "vector"
            info.note = "added to activations, not a matrix"
        elif p.ndim <= 1:
            if is_norm_module(mod) and pname == "weight":
                info.kind, info.role = "gain", "norm_gain"
            elif pname.endswith("bias"):
                info.role = "bias"
        else:
            _classify_matrix(info, model, modules_by_name, p, head_name, conv1d)
    return out


#: layers whose ≥ 2-D parameters are the matrices of linear maps (everything else is a bare tensor)
_MATRIX_LAYERS = (nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase) + _CONVS


def _added_not_applied(mod: nn.Module, pname: str, p) -> bool:
    """True for a ≥ 2-D bare tensor that is added to activations rather than applied to them: a
    leading singleton dimension of ≥ 3 dims (ViT's cls token (1, 1, D) and position table
    (1, N, D), nn.MultiheadAttention's bias_k/bias_v) or a name with "bias" (a relative-position
    bias table). Read as a 1-row matrix its norm was D·RMS (N·D·RMS), so it barely moved."""
    if "bias" in pname.lower():
        return True
    conv1d = hf_conv1d_type()
    if isinstance(mod, _MATRIX_LAYERS + ((conv1d,) if conv1d else ())):
        return False
    return p.ndim >= 3 and p.shape[0] == 1


def is_latent(mod: nn.Module, pname: str) -> bool:
    """True for the tensors a parametrization computes a weight from (``parametrize``'s
    ``original*``; the hook-based weight_norm's ``*_g``/``*_v`` and spectral_norm's ``*_orig``):
    the layer's matrix is a function of them, so their operator norm or a manifold says nothing."""
    if isinstance(mod, parametrize.ParametrizationList):
        return True
    for hook in mod._forward_pre_hooks.values():
        name = getattr(hook, "name", None)
        if isinstance(name, str) and pname in (name + "_g", name + "_v", name + "_orig"):
            return True
    return False


def _head_name(model, conv1d) -> str | None:
    """The head: the last matrix-like leaf named like a head, else the last one if it lies outside
    attention/MLP containers and numbered blocks."""
    leaves = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear,) + ((conv1d,) if conv1d else ())) and getattr(m, "weight", None) is not None]
    head_name = None
    for n, _ in leaves:
        if _HEAD.match(n.split(".")[-1].lower()):
            head_name = n
    if head_name is None and leaves:
        n, _ = leaves[-1]
        parts = _path_parts(n)
        if not _in_container(parts, _ATTN_CONTAINER) and not _in_container(parts, _MLP_CONTAINER) and \
                not any(p.isdigit() for p in parts[:-1]):
            head_name = n
    return head_name


def _classify_matrix(info, model, modules_by_name, p, head_name, conv1d):
    """Layout and role of a matrix parameter (≥ 2-D): by its module type, then where it sits."""
    mname, mod, pname = info.module_name, info.module, info.param_name
    parts = _path_parts(mname)
    leaf = parts[-1] if parts else ""
    info.kind = "matrix"
    is_conv1d_hf = conv1d is not None and isinstance(mod, conv1d) and pname == "weight"
    transposed = isinstance(mod, _CONV_TRANSPOSES) and pname == "weight"
    info.layout = "io" if is_conv1d_hf or transposed else "oi"
    if isinstance(mod, _CONVS) and pname == "weight":
        info.groups = int(mod.groups)
    rows, fan_in = _matrix_shape(mod, p, info.layout)
    types = _ancestor_types(modules_by_name, mname)
    attn_owner = isinstance(mod, nn.MultiheadAttention) or _ATTN_CONTAINER.search(leaf or "") is not None
    in_attn = _in_container(parts, _ATTN_CONTAINER, [t for t in types if class_pattern_attn(t)]) or \
        isinstance(mod, nn.MultiheadAttention)
    in_mlp = _in_container(parts, _MLP_CONTAINER, [t for t in types if t.endswith(("mlp", "feedforward", "ffn"))])
    if isinstance(mod, nn.MultiheadAttention) and pname == "in_proj_weight":
        info.role = "attn_qkv"
        info.segments = (rows // 3,) * 3
        info.heads = mod.num_heads
        info.head_dim = mod.head_dim
    elif isinstance(mod, nn.MultiheadAttention) and pname in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        info.role = "attn_" + pname[0]  # kdim/vdim ≠ embed_dim: rows are still num_heads·head_dim
        info.heads, info.head_dim = mod.num_heads, mod.head_dim
    elif mname == head_name:
        info.role = "head"
    elif in_attn or attn_owner:
        _classify_attention(info, model, parts, rows, fan_in)
    elif in_mlp:
        if _MLP_IN.match(leaf):
            info.role = "mlp_in"
        elif _MLP_OUT.match(leaf):
            info.role = "mlp_out"
        else:  # an expansion reads in, a contraction writes out
            info.role = "mlp_in" if rows >= fan_in else "mlp_out"
    elif isinstance(mod, _CONVS):
        info.role = "conv"
    else:
        info.role = "matrix"


def _classify_attention(info, model, parts, rows, fan_in):
    """Role (q, k, v, fused qkv, o) and head layout of a matrix inside an attention module."""
    leaf = parts[-1] if parts else ""
    attn_mod = _parent(model, info.module_name)
    heads, _, head_dim = _attention_heads(model, attn_mod)
    info.heads, info.head_dim = heads, head_dim or (fan_in // heads if heads and fan_in % heads == 0 else None)
    if _QKV.match(leaf):
        info.role = "attn_qkv"
        info.segments, hd, info.heads = _fused_segments(rows, model, attn_mod, fan_in)
        info.head_dim = hd or info.head_dim
    elif _Q.match(leaf):
        info.role = "attn_q"
    elif _K.match(leaf):
        info.role = "attn_k"
    elif _V.match(leaf):
        info.role = "attn_v"
    elif _O.match(leaf) or parts[-2:-1] and _O.match(parts[-2]):
        info.role = "attn_o"
    else:
        info.role = "attn"


def _parent(model, mname):
    if "." not in mname:
        return model
    return model.get_submodule(mname.rsplit(".", 1)[0])
