"""adapt on a zoo of plain-torch models nobody here wrote: the documented promises, checked.

Every parameter gets exactly one view, the dual of a gradient has the modular norm asked for, and
DualizeRetract and DualizeAdamW lower a toy loss in 20 steps with every trainable parameter moved
and nothing non-finite (recurrent, bilinear, convolutional, norm and attention layers, reuse,
float64 and bfloat16). Then the defects found there: tensors added to activations (cls tokens,
position tables, MultiheadAttention's bias_k/bias_v) read as one-row matrices, EmbeddingBag read
as a Linear, a zero-initialised weight sent to DGram, split_heads ignored for kdim/vdim attention,
and a sparse embedding under DualizeAdamW.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modula_mhc as mm
from modula_mhc.adapt.views import EmbedView, MatrixView, VectorView

pytestmark = pytest.mark.usefixtures("one_thread")


def rms(t):
    return float(t.detach().double().pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------ zoo
class _RNN(nn.Module):
    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(6, 8, num_layers=2, batch_first=True, **kw)
        out = kw.get("proj_size") or 8
        self.head = nn.Linear(out * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class _BilinearPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil, self.act = nn.Bilinear(4, 6, 5), nn.PReLU(5)

    def forward(self, pair):  # a tuple input
        return self.act(self.bil(*pair))


class _ConvNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)
        self.gn, self.inorm = nn.GroupNorm(2, 6), nn.InstanceNorm1d(6, affine=True)
        self.c3, self.ln, self.rms = nn.Conv3d(1, 2, 2), nn.LayerNorm(6, bias=False), nn.RMSNorm(6)
        self.fc = nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, batch, *, scale=None):  # a dict input and a keyword
        h = self.inorm(self.gn(self.bn(self.c1(batch["seq"])))).mean(-1)
        g = self.c3(batch["vol"]).mean((-1, -2, -3))
        return self.fc(torch.cat([self.rms(self.ln(h)), g], -1)) * (self.scale if scale is None else scale)


class _Reused(nn.Module):
    """One Linear applied twice, a transposed tie, and bare parameters used with F.linear."""

    def __init__(self):
        super().__init__()
        self.inp, self.mix = nn.Linear(4, 8), nn.Linear(8, 8)
        self.W = nn.Parameter(torch.randn(8, 8) / 3)
        self.dec_bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.inp(x)))))
        return F.linear(torch.tanh(F.linear(h, self.W)), self.inp.weight.t(), self.dec_bias)


class _CrossAttention(nn.Module):
    """MultiheadAttention with kdim/vdim ≠ embed_dim and no bias, and add_bias_kv."""

    def __init__(self):
        super().__init__()
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=False, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

    def forward(self, q, k, v):
        h = self.cross(q, k, v)[0]
        return self.attn(h, h, h)[0]


def _encoder(norm_first, batch_first):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


ZOO = {
    "encoder-post-batch-first": (lambda: _encoder(False, True), lambda: (torch.randn(4, 5, 8),)),
    "encoder-pre-seq-first": (lambda: _encoder(True, False), lambda: (torch.randn(5, 4, 8),)),
    "decoder-layer": (lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                      lambda: (torch.randn(4, 5, 8), torch.randn(4, 3, 8))),
    "mha-kdim-bias-kv": (_CrossAttention, lambda: (torch.randn(4, 5, 8), torch.randn(4, 3, 4), torch.randn(4, 3, 6))),
    "lstm-bidirectional-proj": (lambda: _RNN(nn.LSTM, bidirectional=True, proj_size=4), lambda: (torch.randn(4, 5, 6),)),
    "gru": (lambda: _RNN(nn.GRU), lambda: (torch.randn(4, 5, 6),)),
    "rnn-bidirectional": (lambda: _RNN(nn.RNN, bidirectional=True), lambda: (torch.randn(4, 5, 6),)),
    "bilinear-prelu": (_BilinearPReLU, lambda: ((torch.randn(8, 4), torch.randn(8, 6)),)),
    "conv1d-3d-norms": (_ConvNorms, lambda: ({"seq": torch.randn(4, 3, 10), "vol": torch.randn(4, 1, 3, 3, 3)},)),
    "reuse-and-transposed-tie": (_Reused, lambda: (torch.randn(8, 4),)),
}


def _train(model, net, opt, inputs, target, steps=20):
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(*inputs).float(), target)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _check_zoo_model(make, inputs_of, preset, optimizer, dtype=torch.float32):
    torch.manual_seed(0)
    model = make().to(dtype)
    inputs = inputs_of()
    inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) else x for x in inputs)
    net = mm.adapt(model, preset)
    # one view per distinct trainable parameter, each parameter exactly once, shapes kept
    weights = [a.weight for a in net.atoms()]
    assert len({id(w) for w in weights}) == len(weights) == len(list(model.parameters()))
    assert all(tuple(a.shape) == tuple(a.weight.shape) for a in net.atoms())
    grads = [torch.randn_like(p) for p in net.parameters()]
    assert float(net.norm(net.dualize(grads, target_norm=0.5))) == pytest.approx(0.5, rel=2e-2 if dtype == torch.bfloat16 else 1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = mm.optim.DualizeRetract(net, lr=0.05) if optimizer == "dualize" else mm.adapt.DualizeAdamW(net, lr=0.05, adamw_lr=1e-2)
    with torch.no_grad():
        target = torch.randn_like(model(*inputs).float())
    losses = _train(model, net, opt, inputs, target)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    # (in bfloat16 a gain of 1 keeps its value under steps below its spacing 2⁻⁷, as with any optimizer)
    assert not unmoved or dtype == torch.bfloat16, unmoved
    return net, opt


@pytest.mark.parametrize("optimizer", ["dualize", "adamw-split"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_views_norms_and_training(name, optimizer):
    make, inputs_of = ZOO[name]
    # Stiefel/DGram where the roles are attention/MLP ones; elsewhere "hetero" is "muon"
    _check_zoo_model(make, inputs_of, "hetero" if name.startswith(("encoder", "decoder")) else "muon", optimizer)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_zoo_in_float64_and_bfloat16_keeps_the_dtype(dtype):
    make, inputs_of = ZOO["encoder-pre-seq-first"]
    _, _ = _check_zoo_model(make, inputs_of, "muon", "dualize", dtype)
    model = make().to(dtype)
    mm.adapt(model, "hetero")
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_zoo_state_dict_and_optimizer_round_trip_bit_exact():
    """A trained zoo model and its DualizeAdamW state, reloaded into a fresh copy, take the same
    next step, bit for bit (buffers, kwargs-taking forward, dict inputs)."""
    import copy
    make, inputs_of = ZOO["conv1d-3d-norms"]
    model, net, opt = None, None, None
    net, opt = _check_zoo_model(make, inputs_of, "muon", "adamw-split")
    model = net.model
    twin = make()
    twin.load_state_dict(model.state_dict())
    opt2 = mm.adapt.DualizeAdamW(mm.adapt(twin, "muon"), lr=0.05, adamw_lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.manual_seed(1)
    x = inputs_of()
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(*x, scale=torch.tensor(2.0)).square().mean().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.buffers(), twin.buffers()))


def test_thin_and_wide_linears_have_the_rms_operator_norm():
    """1×4096, 4096×1 and 1×1 Linears: the dual at target t has RMS→RMS norm t under every
    matrix manifold, and a step stays finite."""
    for preset in ("muon", "all-stiefel", "all-dgram"):
        for out, inp in ((1, 4096), (4096, 1), (1, 1)):
            torch.manual_seed(0)
            lin = nn.Linear(inp, out, bias=False)
            v = mm.adapt(nn.Sequential(lin), preset).atoms()[0]
            A = v.dualize_weight(torch.randn(out, inp), target=0.5)
            assert float(torch.linalg.matrix_norm(A, 2)) * math.sqrt(inp / out) == pytest.approx(0.5, rel=1e-4)
            assert float(v.weight_norm(A)) == pytest.approx(0.5, rel=1e-4)


# ---------------------------------------------------------------------------------- the defects
class _ViT(nn.Module):
    """timm-style: a zero cls token (1, 1, D) and a position table (1, N, D) added to the patches."""

    def __init__(self, d=16, n=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.patch = nn.Linear(12, d)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 2 * d, 0.0, batch_first=True, norm_first=True)
                                     for _ in range(1)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], 1) + self.pos_embed
        for b in self.blocks:
            h = b(h)
        return self.head(h[:, 0])


@pytest.mark.parametrize("preset", ["muon", "all-stiefel", "all-dgram"])
def test_tokens_position_tables_and_bias_kv_are_vectors_not_one_row_matrices(preset):
    """"Biases, every other parameter: ‖w‖_RMS" (docs/adapt.md). Read as (1, D) and (1, N·D)
    matrices, the cls token's norm was D·RMS = 16·RMS and the position table's (N+1)·D·RMS =
    80·RMS (a unit dual moved it by RMS 1/80); all-stiefel rewrote the zero cls token to a unit
    vector at adapt, and all-dgram failed in the first dual solve. bias_k/bias_v likewise."""
    torch.manual_seed(0)
    model = _ViT()
    model.blocks[0].self_attn = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
    added = {"cls_token": model.cls_token, "pos_embed": model.pos_embed,
             "blocks.0.self_attn.bias_k": model.blocks[0].self_attn.bias_k,
             "blocks.0.self_attn.bias_v": model.blocks[0].self_attn.bias_v}
    before = {k: p.detach().clone() for k, p in added.items()}
    net = mm.adapt(model, preset)
    views = {net.name_of(a): a for a in net.atoms()}
    for name, p in added.items():
        v = views[name]
        assert isinstance(v, VectorView) and v.manifold.name == "euclidean", (name, type(v).__name__)
        assert torch.equal(p, before[name])  # not projected onto a manifold at adapt
        assert float(v.weight_norm(torch.full_like(p, 0.3))) == pytest.approx(0.3, rel=1e-6)
        assert rms(v.dualize_weight(torch.randn_like(p), target=0.7)) == pytest.approx(0.7, rel=1e-5)
    assert views["blocks.0.self_attn.bias_k"].role == "bias" and views["cls_token"].role == "vector"
    grads = [torch.randn_like(p) for p in net.parameters()]
    assert float(net.norm(net.dualize(grads, target_norm=0.5))) == pytest.approx(0.5, rel=1e-4)
    opt = mm.optim.DualizeRetract(net, lr=0.05)
    model(torch.randn(3, 4, 12)).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert rms(model.cls_token) > 0  # the zero token moves


def test_embedding_bag_is_an_embedding():
    """nn.EmbeddingBag's (num_embeddings, dim) table was read as a Linear from dim to
    num_embeddings: role "matrix", norm ‖W‖₂·√(dim/num) instead of the max row RMS, and projected
    onto Stiefel by all-stiefel (every row rewritten)."""
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.out = nn.EmbeddingBag(20, 8, mode="mean"), nn.Linear(8, 2)

        def forward(self, idx):
            return self.out(self.bag(idx))

    model = Bag()
    w0 = model.bag.weight.detach().clone()
    net = mm.adapt(model, "all-stiefel")
    v = net.atoms()[0]
    assert isinstance(v, EmbedView) and v.role == "embed" and torch.equal(model.bag.weight, w0)
    assert float(v.weight_norm()) == pytest.approx(float(w0.pow(2).mean(-1).sqrt().max()), rel=1e-6)
    A = v.dualize_weight(torch.randn(20, 8), target=0.4)
    assert torch.allclose(A.pow(2).mean(-1).sqrt(), torch.full((20,), 0.4), rtol=1e-5)


def _zero_init_mlp_model():
    class Block(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            nn.init.zeros_(self.mlp[2].weight)  # "zero-init the residual projection"

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h)[0]
            return x + self.mlp(self.ln2(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head = nn.ModuleList([Block(), Block()]), nn.Linear(8, 2)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)
    return Net()


def test_zero_initialised_weight_on_dgram_is_refused_at_adapt_naming_it():
    """DGram keeps column norms, so a zero-initialised MLP output can never move there; "hetero"
    put it there silently and the first opt.step() raised "dualize: W's columns are linearly
    dependent ... retract W onto the manifold first" (no name, and retracting does not help).
    Now adapt refuses, naming it, before touching any weight; Stiefel (any preset) still works."""
    torch.manual_seed(0)
    model = _zero_init_mlp_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.2\.weight.*zero"):
        mm.adapt(model, "hetero")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing projected
    net = mm.adapt(model, {"attn_*": "stiefel", "mlp_in": "dgram", "mlp_out": "stiefel"})
    opt = mm.optim.DualizeRetract(net, lr=0.05)
    model(torch.randn(2, 3, 8)).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_split_heads_splits_kdim_vdim_attention_projections():
    """split_heads: "also split fused and separate q/k/v projections into heads when the model
    says how many". nn.MultiheadAttention(kdim, vdim) says num_heads, but its separate
    q/k/v_proj_weight stayed one piece each while its fused in_proj_weight was split."""
    mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=12, bias=False)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, q, k, v):
            return self.mha(q, k, v)[0]

    net = mm.adapt(M(), "hetero", split_heads=True)
    views = {net.name_of(a): a for a in net.atoms()}
    for p in ("q", "k", "v"):
        v = views[f"mha.{p}_proj_weight"]
        assert isinstance(v, MatrixView) and v.pieces == (4, 4, 4, 4), (p, v.pieces)
    assert views["mha.out_proj.weight"].pieces == (16,)
    g = torch.randn_like(mha.k_proj_weight)
    A = views["mha.k_proj_weight"].dualize_weight(g, target=1.0)
    # every head is its own Stiefel piece: each (4, 8) block has RMS→RMS norm 1
    for blk in A.split(4, 0):
        assert float(torch.linalg.matrix_norm(blk, 2)) * math.sqrt(8 / 4) == pytest.approx(1.0, rel=1e-3)


def test_dualize_adamw_refuses_a_sparse_embedding_at_construction():
    """nn.Embedding(sparse=True): DualizeRetract says so clearly at its step; DualizeAdamW failed
    in its first step with torch's "Could not run 'aten::ne.Scalar' ... 'SparseCPU' backend"."""
    class M(nn.Module):
        def __init__(self, sparse):
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 8, sparse=sparse), nn.Linear(8, 2)

        def forward(self, i):
            return self.out(self.emb(i).mean(1))

    with pytest.raises(TypeError, match=r"emb\.weight.*sparse"):
        mm.adapt.DualizeAdamW(mm.adapt(M(True)))
    frozen = M(True)
    frozen.emb.weight.requires_grad_(False)
    mm.adapt.DualizeAdamW(mm.adapt(frozen))  # no gradient at all: nothing to refuse
    mm.adapt.DualizeAdamW(mm.adapt(M(False)))
