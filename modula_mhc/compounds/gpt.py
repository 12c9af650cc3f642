"""A GPT: embedding, residual blocks of attention and MLP, head."""
from __future__ import annotations

from .. import atoms, bonds
from .. import scalars as S
from .._inputs import check_input
from ..algebra import Compose, repeat, residual
from ._util import check_positive_int, is_positive_integer, set_total_mass
from .attention import Attention
from .hyper import CollapseStreams, ExpandStreams, HyperConnections

__all__ = ["Block", "GPT", "hyper_block"]

RESIDUALS = ("plain", "hc", "mhc")


def attention_branch(width, heads, manifold="euclidean", temperature=1.0):
    """x ↦ Attention(RMSNorm(x))."""
    return Attention(width, heads, manifold=manifold, temperature=temperature) @ bonds.RMSNorm()


def mlp_branch(width, ratio=4, manifold="euclidean", activation_fn=None):
    """x ↦ W_out φ(W_in RMSNorm(x)) with hidden width ratio·width."""
    act = activation_fn if activation_fn is not None else bonds.GELU()
    hidden = ratio * width
    if not S.is_symbolic(hidden):  # named here: Linear's own error says only "dimensions (C, 2.4)"
        if isinstance(ratio, bool) or not is_positive_integer(hidden):
            raise ValueError(f"mlp_ratio·width (the MLP's hidden width) must be a positive integer, "
                             f"got mlp_ratio={ratio!r}, width={width!r}")
        hidden = int(hidden)
    return atoms.Linear(hidden, width, manifold=manifold, role="mlp_out") @ act \
        @ atoms.Linear(width, hidden, manifold=manifold, role="mlp_in") @ bonds.RMSNorm()


class Block(Compose):
    """Block(width, heads, depth): two residual branches, attention then MLP, each
    x ↦ (1 − 1/(2L))x + 1/(2L)·branch(x) with L = depth (the number of blocks in the network)."""

    def __init__(self, width, heads, depth, mlp_ratio=4, attn_manifold="euclidean", mlp_manifold="euclidean",
                 attn_temperature=1.0):
        check_positive_int("depth", depth)
        two_l = 2 * depth
        super().__init__(residual(attention_branch(width, heads, attn_manifold, attn_temperature), two_l),
                         residual(mlp_branch(width, mlp_ratio, mlp_manifold), two_l))
        self.in_dim = self.out_dim = width


def hyper_block(width, heads, depth, streams=4, constrained=True, mlp_ratio=4, attn_manifold="euclidean",
                mlp_manifold="euclidean", attn_temperature=1.0, **options):
    """A GPT block on streams (B, T, n, C): HC/mHC around the attention branch, then around the MLP
    branch, each with ``depth = 2·depth`` (two hyper-connected branches per block)."""
    if "depth" in options:
        raise TypeError("hyper_block: depth is set from the GPT depth (2 branches per block)")
    kw = dict(streams=streams, constrained=constrained, depth=2 * depth, width=width, **options)
    block = Compose(HyperConnections(attention_branch(width, heads, attn_manifold, attn_temperature), **kw),
                    HyperConnections(mlp_branch(width, mlp_ratio, mlp_manifold), **kw))
    block.in_dim = block.out_dim = width
    return block


class GPT(Compose):
    """GPT(vocab_size, context, width, depth, heads, residual="plain"|"hc"|"mhc", streams=4,
    attn_manifold="euclidean", mlp_manifold="euclidean", attn_temperature=1.0).

    Manifolds default to Euclidean (Muon): Hetero (attn "stiefel", mlp "dgram") is one argument
    away but its certified dual solve costs far more per step (docs/decisions.md).

    Embed → depth blocks → RMSNorm → Linear head (logits). Masses: embed 1, head 1, and the
    blocks together ``blocks_mass`` (split equally between their atoms), so the share of learning
    per part does not drift with depth. Input: token ids (B, T) with T ≤ context.

    Declared sensitivity (after the embedding): ≤ e^((H−1)/2 + 0.0645) for H heads, on the domain
    where every RMSNorm — the final one included — sees inputs of RMS ≥ 1. The convex residual
    shrinks the stream (RMS ≈ 0.3 at the final RMSNorm at init), so a GPT is normally *outside*
    that domain: ``claims.certify(gpt, tokens)`` reports it and gives the constants that hold at
    that batch (docs/algebra.md, "Certified domain")."""

    def __init__(self, vocab_size, context, width, depth, heads, residual="plain", streams=4,
                 attn_manifold="euclidean", mlp_manifold="euclidean", mlp_ratio=4, blocks_mass=5.0,
                 embed_mass=1.0, head_mass=1.0, attn_temperature=1.0, **hyper_options):
        for n, v in (("vocab_size", vocab_size), ("context", context), ("width", width), ("depth", depth),
                     ("heads", heads), ("streams", streams)):
            check_positive_int(n, v)
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        if not S.is_symbolic(width, heads) and width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.vocab_size, self.context, self.width, self.depth, self.heads = vocab_size, context, width, depth, heads
        self.streams = streams
        if residual == "plain":
            if hyper_options:
                raise TypeError(f"unexpected options for residual='plain': {sorted(hyper_options)}")
            block = Block(width, heads, depth, mlp_ratio, attn_manifold, mlp_manifold, attn_temperature)
        else:
            block = hyper_block(width, heads, depth, streams=streams, constrained=(residual == "mhc"),
                                mlp_ratio=mlp_ratio, attn_manifold=attn_manifold, mlp_manifold=mlp_manifold,
                                attn_temperature=attn_temperature, **hyper_options)
        set_total_mass(block, S.fraction(1, 1, like=depth) * blocks_mass / depth)
        body = repeat(block, depth)
        layers = [atoms.Embed(vocab_size, width, mass=embed_mass)]
        if residual != "plain":
            layers += [ExpandStreams(streams), body, CollapseStreams(streams)]
        else:
            layers.append(body)
        layers += [bonds.RMSNorm(), atoms.Linear(width, vocab_size, manifold="euclidean", mass=head_mass, role="head")]
        super().__init__(*layers)

    def forward(self, idx):
        check_input(idx, f"GPT(context={self.context})", min_dim=1)  # token ids (..., T)
        if idx.shape[-1] > self.context:
            raise ValueError(f"GPT(context={self.context}) got a sequence of length {idx.shape[-1]}")
        return super().forward(idx)
