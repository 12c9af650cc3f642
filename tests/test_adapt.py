"""modula_mhc.adapt: bring your own model (issue 13).

Atom views over a foreign model's own parameters (state_dict / save_pretrained unchanged), roles
and structure inferred from the module tree, DualizeRetract and DualizeAdamW on the result,
HC/mHC around nn.Module branches, and training on models nobody here wrote (Hugging Face GPT-2 and
Llama from configs, a ResNet with BatchNorm) to a loss no worse than AdamW's, best of a small lr
grid each. Hugging Face tests skip without ``transformers``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch
from torch import nn

import modula_mhc as mm
from modula_mhc.adapt import (
    DualizeAdamW,
    expand_streams,
    hyper_connections,
    reduce_streams,
)
from modula_mhc.adapt.views import MatrixView

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
import adapt_models as M

pytestmark = pytest.mark.usefixtures("one_thread")


def hf():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chars():
    return M.CharBatches(M.load_text(max_chars=200_000), context=32, batch=8)


def tiny_gpt2(vocab=50, width=32, depth=2):
    hf()
    return M.gpt2(vocab, width=width, depth=depth, heads=4, context=32)


def tiny_llama(vocab=50, width=32, depth=2):
    hf()
    return M.llama(vocab, width=width, depth=depth, heads=4, context=32)


# ------------------------------------------------------------------------------------ the wrapper
def test_plain_torch_model_trains_with_dualize_retract():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match="_mm_atom"):
        mm.optim.DualizeRetract(nn.Sequential(nn.Linear(3, 3)).parameters())
    net = mm.adapt(model)
    assert [p for p in net.parameters()] == [p for p in model.parameters()]
    opt = mm.optim.DualizeRetract(net, lr=0.05)
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    first = None
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first
    # also with the parameters alone (each coefficient 1): the tags are on the model's tensors
    mm.optim.DualizeRetract(model.parameters(), lr=0.05)


def test_views_are_the_models_own_tensors_and_state_dict_is_unchanged():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    keys = list(model.state_dict())
    net = mm.adapt(model)
    assert list(model.state_dict()) == keys
    assert [k[len("model."):] for k in net.state_dict()] == keys
    for v, (name, p) in zip(net.atoms(), model.named_parameters()):
        assert v.weight is p and v.name == name
    sd = {k: torch.randn_like(t) for k, t in model.state_dict().items()}
    model.load_state_dict(sd)
    assert torch.equal(net.atoms()[0].weight, sd["0.weight"])
    assert net(torch.randn(3, 4)).shape == (3, 2)
    # the tags neither break torch.save(model) nor follow a deep copy (a copy is adapted again)
    import copy
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert getattr(torch.load(buf, weights_only=False)[0].weight, "_mm_atom", None) is None
    twin = copy.deepcopy(net)
    assert twin.atoms()[0].weight is twin.model[0].weight
    mm.optim.DualizeRetract(twin, lr=0.1)


def test_modular_norm_of_the_dual_is_the_target():
    """net.norm(net.dualize(g, t)) == t for every kind of view (Linear, Conv2d, Conv1d, embedding,
    norm gain, bias)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.c1 = nn.Conv1d(6, 4, 3)
            self.c2 = nn.Conv2d(1, 3, 2)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 5)
    net = mm.adapt(Net())
    grads = [torch.randn_like(p) for p in net.parameters()]
    for t in (0.3, 1.0):
        upd = net.dualize(grads, target_norm=t)
        assert float(net.norm(upd)) == pytest.approx(t, rel=1e-3)
        for a, c, u in zip(net.atoms(), net.norm_coefficients(), upd):
            assert float(c * a.weight_norm(u)) == pytest.approx(t, rel=1e-3)
    assert all(z is None or torch.count_nonzero(z) == 0 for z in net.dualize([torch.zeros_like(g) for g in grads]))


def test_linear_view_norm_is_the_rms_operator_norm():
    lin = nn.Linear(16, 4, bias=False)
    v = mm.adapt(nn.Sequential(lin)).atoms()[0]
    W = lin.weight.detach()
    assert float(v.weight_norm().detach()) == pytest.approx(float(torch.linalg.matrix_norm(W, 2)) * math.sqrt(16 / 4), rel=1e-4)
    A = v.dualize_weight(torch.randn(4, 16), target=1.0)
    # a unit dual moves every unit-RMS input by at most RMS 1, and some by exactly 1
    assert float(torch.linalg.matrix_norm(A, 2)) == pytest.approx(math.sqrt(4 / 16), rel=1e-3)


def _pixel_gain(apply, channels, size, steps=120, seed=0):
    """Adversarial lower bound on max over x of (max-pixel RMS over channels of apply(x)) for inputs
    of per-pixel RMS ≤ 1: gradient ascent on a smoothed maximum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, channels) + size, generator=g, dtype=torch.float64)
    best = 0.0
    for _ in range(steps):
        x = (x / x.pow(2).mean(1, keepdim=True).sqrt()).requires_grad_(True)
        y2 = apply(x).pow(2).mean(1)
        best = max(best, float(y2.detach().max().sqrt()))
        (gx,) = torch.autograd.grad(y2.pow(4).mean(), x)
        x = (x + 0.3 * gx / gx.abs().max()).detach()
    return best


@pytest.mark.parametrize("make,size,floor", [
    (lambda: nn.Conv2d(8, 8, 3, groups=8, bias=False), (5, 5), 0.9),            # depthwise
    (lambda: nn.Conv2d(16, 8, 1, groups=4, bias=False), (2, 2), 0.9),            # grouped 1×1
    (lambda: nn.Conv1d(6, 9, 3, groups=3, bias=False), (7,), 0.9),
    (lambda: nn.ConvTranspose2d(8, 4, 3, bias=False), (3, 3), 0.9),
    # stride = kernel: each output pixel sees one tap, so the bound holds but is loose (~1/k)
    (lambda: nn.ConvTranspose2d(4, 12, 2, stride=2, bias=False), (3, 3), 0.3),
    (lambda: nn.ConvTranspose1d(6, 4, 3, groups=2, bias=False), (5,), 0.9),
])
def test_grouped_and_transposed_conv_views_measure_the_operator_norm(make, size, floor):
    """A unit dual step of a grouped (block-diagonal) or transposed convolution moves per-pixel-RMS-1
    inputs by at most RMS 1, and some by nearly 1 (before: depthwise 3.4–4×, transposed 8×)."""
    torch.manual_seed(0)
    conv = make().double()
    v = mm.adapt(nn.Sequential(conv)).atoms()[0]
    assert v.role == "conv" and v.sensitivity == 1.0
    A = v.dualize_weight(torch.randn_like(conv.weight), target=1.0)
    assert float(v.weight_norm(A)) == pytest.approx(1.0, rel=1e-3)
    assert torch.equal(v._unmatrix(v._matrix(A), A), A)  # the layout round-trips

    def apply(x):  # the layer with the step A as its weight
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            f = {1: nn.functional.conv_transpose1d, 2: nn.functional.conv_transpose2d}[x.ndim - 2]
            return f(x, A, stride=conv.stride, groups=conv.groups)
        return conv._conv_forward(x, A, None)
    gain = max(_pixel_gain(apply, conv.in_channels, size, seed=s) for s in (0, 1))
    assert floor <= gain <= 1.0 + 1e-6, gain


def test_stiefel_and_dgram_views_stay_on_their_manifolds():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.q_proj, self.attn.o_proj = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.mlp = nn.Module()
            self.mlp.up_proj, self.mlp.down_proj = nn.Linear(8, 32, bias=False), nn.Linear(32, 8, bias=False)

        def forward(self, x):
            x = x + self.attn.o_proj(torch.tanh(self.attn.q_proj(x)))
            return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))

    model = nn.Sequential(Block(), Block())
    net = mm.adapt(model, "hetero")
    roles = {v.name: (v.role, v.manifold.name) for v in net.atoms()}
    assert roles["0.attn.q_proj.weight"] == ("attn_q", "stiefel")
    assert roles["1.mlp.down_proj.weight"] == ("mlp_out", "dgram")
    opt = mm.optim.DualizeRetract(net, lr=0.1)
    x = torch.randn(16, 8)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for v in net.atoms():
        unit = v._matrix(v.weight.detach()) / v.gains[0]
        assert v.manifold.contains(unit, tol=1e-3), v.name


def test_manifold_rules_and_role_overrides():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net = mm.adapt(model, {"0.weight": "stiefel"}, roles={"2.weight": "mlp_out"})
    assert [v.manifold.name for v in net.atoms() if v.weight.ndim == 2] == ["stiefel", "euclidean"]
    assert net.atoms()[2].role == "mlp_out"
    with pytest.raises(ValueError, match="only matrices"):
        mm.adapt(nn.Sequential(nn.Linear(4, 4)), {"*bias": "stiefel"})
    with pytest.raises(ValueError, match="unknown manifold preset"):
        mm.adapt(model, "nope")
    with pytest.raises(TypeError):
        mm.adapt(mm.atoms.Linear(3, 3))


class _TwoLayer(nn.Module):  # no container to read: the structure is defaulted
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_sequential_structure_is_recovered():
    net = mm.adapt(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert net.recovered and "Sequential" in net.structure_summary
    c = dict(zip((v.name for v in net.atoms()), net.norm_coefficients()))
    # as native Compose: (W2 + b2) ∘ act ∘ (W1 + b1), masses 1 and 0.1: total 2.2, each matrix
    # 2.2/1 (the sensitivities after W1 are 1), each bias 2.2/1.1 · 1.1/0.1 = 22
    assert c["0.weight"] == pytest.approx(2.2) and c["2.weight"] == pytest.approx(2.2)
    assert c["0.bias"] == pytest.approx(22) and c["2.bias"] == pytest.approx(22)


def test_describe_table_and_defaulted_structure(capsys):
    net = mm.adapt(_TwoLayer())
    text = net.describe()
    assert capsys.readouterr().out.strip() == text.strip()
    for col in ("parameter", "shape", "role", "manifold", "norm coef", "structure"):
        assert col in text
    assert "defaulted" in text and net.norm_coefficients() == [1.0] * 4
    assert math.isinf(net.sensitivity)


def test_multihead_attention_fused_in_proj_split_per_projection_and_head():
    mha = nn.MultiheadAttention(16, 4)
    net = mm.adapt(nn.Sequential(mha), split_heads=True)
    v = net.atoms()[0]
    assert v.role == "attn_qkv" and v.segments == (16, 16, 16) and len(v.pieces) == 12
    G = torch.randn_like(v.weight)
    A = v.dualize_weight(G, target=1.0)
    for P in A.split(4, dim=0):  # every head of every projection is a unit step in its own norm
        assert float(torch.linalg.matrix_norm(P, 2)) == pytest.approx(math.sqrt(4 / 16), rel=1e-3)


# ------------------------------------------------------------------------------------ Hugging Face
def test_gpt2_roles_fused_qkv_conv1d_tied_head_and_structure():
    model = tiny_gpt2()
    net = mm.adapt(model, "hetero")
    by = {v.name: v for v in net.atoms()}
    qkv = by["transformer.h.0.attn.c_attn.weight"]
    assert isinstance(qkv, MatrixView) and qkv.layout == "io" and qkv.segments == (32, 32, 32)
    assert (qkv.role, qkv.manifold.name) == ("attn_qkv", "stiefel")
    assert by["transformer.h.1.mlp.c_proj.weight"].role == "mlp_out"
    assert by["transformer.h.1.attn.c_proj.weight"].role == "attn_o"
    wte = by["transformer.wte.weight"]
    assert wte.role == "embed" and "lm_head.weight" in wte.note and "lm_head.weight" not in by
    assert by["transformer.h.0.ln_1.weight"].role == "norm_gain"
    assert by["transformer.h.0.ln_1.bias"].role == "bias"
    assert net.recovered and all(v.structure == "recovered" for v in net.atoms())
    # the fused view is three projections: each q/k/v slice is on Stiefel at gain √(32/32)
    for P in model.transformer.h[0].attn.c_attn.weight.detach().mT.split(32):
        assert mm.manifolds.Stiefel().contains(P, tol=1e-3)
    # as in compounds.GPT: q/k/v coefficient a third of o's within a block
    c = dict(zip([v.name for v in net.atoms()], net.norm_coefficients()))
    assert c["transformer.h.0.attn.c_proj.weight"] == pytest.approx(3 * c["transformer.h.0.attn.c_attn.weight"])


def test_llama_roles_gqa_and_heads():
    model = tiny_llama()
    net = mm.adapt(model, "hetero", split_heads=True)
    by = {v.name: v for v in net.atoms()}
    assert by["model.layers.0.self_attn.k_proj.weight"].role == "attn_k"
    assert len(by["model.layers.0.self_attn.k_proj.weight"].pieces) == 2  # 2 kv heads of 8
    assert len(by["model.layers.0.self_attn.q_proj.weight"].pieces) == 4
    assert by["model.layers.0.mlp.gate_proj.weight"].role == "mlp_in"
    assert by["model.layers.0.mlp.down_proj.weight"].manifold.name == "dgram"
    assert by["lm_head.weight"].role == "head" and by["lm_head.weight"].manifold.name == "euclidean"
    assert by["model.embed_tokens.weight"].role == "embed"
    # the two norms feed different branches (input_layernorm → attention, post_attention → MLP)
    # shadow: embed, then per block two residuals (Compose flattens), then norm, head
    attn_branch, mlp_branch = (r.branches[1].module for r in net._shadow.layers[1:3])
    assert by["model.layers.0.input_layernorm.weight"] in attn_branch.atoms()
    assert by["model.layers.0.self_attn.q_proj.weight"] in attn_branch.atoms()
    assert by["model.layers.0.post_attention_layernorm.weight"] in mlp_branch.atoms()
    assert by["model.layers.0.mlp.up_proj.weight"] in mlp_branch.atoms()


def test_llama_hetero_per_head_steps_stay_on_the_manifolds(chars):
    model = tiny_llama(vocab=chars.vocab)
    net = mm.adapt(model, "hetero", split_heads=True)
    opt = mm.optim.DualizeRetract(net, lr=0.1)
    loss = M.lm_loss(model, chars.train(0))
    loss.backward()
    opt.step()
    assert math.isfinite(float(loss.detach()))
    for v in net.atoms():
        if isinstance(v, MatrixView) and v.manifold.name == "stiefel":
            for P in v._pieces_of(v._matrix(v.weight.detach())):  # every head on Stiefel
                assert v.manifold.contains(P, tol=1e-3), v.name
    d = opt.diagnostics()
    assert any("iterations" in x for x in d.values())


def test_dualize_adamw_skips_non_finite_steps():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
    net = mm.adapt(model)
    opt = DualizeAdamW(net)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([1, 2])).sum().backward()
    model[0].weight.grad[1, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(FloatingPointError):
        DualizeAdamW(net, nonfinite="raise").step()


def test_gpt2_save_pretrained_round_trip_after_training(tmp_path, chars):
    model = tiny_gpt2(vocab=chars.vocab)
    keys = list(model.state_dict())
    net = mm.adapt(model, "hetero")
    opt = mm.optim.DualizeRetract(net, lr=0.1)
    for step in range(2):
        loss = M.lm_loss(model, chars.train(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    x = chars.train(5)[0]
    model.eval()
    torch.testing.assert_close(again(x).logits, model(x).logits)


def test_dualize_adamw_split_and_scheduler(chars):
    model = tiny_llama(vocab=chars.vocab)
    net = mm.adapt(model)
    opt = DualizeAdamW(net, lr=0.1, adamw_lr=3e-3)
    adam_params = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    for v in net.atoms():
        assert (id(v.weight) in adam_params) == (v.role in ("embed", "head") or v.weight.ndim < 2), v.name
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    first = None
    for step in range(8):
        loss = M.lm_loss(model, chars.train(step))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert float(loss.detach()) < first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 9)
    assert opt.param_groups[-1]["lr"] == pytest.approx(3e-3 / 9)
    sd = opt.state_dict()
    opt.load_state_dict(sd)


# ------------------------------------------------------------------------------------ DualizeAdamW as a torch optimizer
def _emb_mlp(seed=0):
    """A tiny model with both kinds of parameters: a matrix (DualizeRetract) and embed/head/biases (AdamW)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 20))


def _train_step(model, opt, step):
    idx = torch.randint(0, 20, (16,), generator=torch.Generator().manual_seed(step))
    opt.zero_grad()
    nn.functional.cross_entropy(model(idx), idx).backward()
    opt.step()


def test_dualize_adamw_add_param_group_routes_like_the_constructor():
    model = _emb_mlp()
    opt = DualizeAdamW(mm.adapt(model), momentum=0.9, adamw_betas=(0.8, 0.95))
    block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    block_net = mm.adapt(block)  # noqa: F841 — the views (the parameters' atoms) must stay alive
    extra = nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [block[0].weight], "lr": 0.05})  # role "matrix"
    opt.add_param_group({"params": block[0].bias, "momentum": 0.7})  # role "bias"; momentum = beta1
    opt.add_param_group({"params": [extra]})  # no atom: AdamW's "the rest"
    dual, adam = opt.dualize_retract.param_groups, opt.adamw.param_groups
    assert [g["params"] for g in dual[1:]] == [[block[0].weight]] and dual[1]["lr"] == 0.05
    assert dual[1]["momentum"] == 0.9
    assert adam[1]["params"] == [block[0].bias] and adam[1]["betas"] == (0.7, 0.95) and adam[1]["momentum"] == 0.7
    assert adam[2]["params"] == [extra] and adam[2]["betas"] == (0.8, 0.95) and adam[2]["lr"] == 3e-3
    assert len(opt.param_groups) == 5
    with pytest.raises(ValueError, match="two groups"):
        opt.add_param_group({"params": [block[2].weight, nn.Parameter(torch.randn(2))]})
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [model[1].weight]})
    before = [p.detach().clone() for p in (block[0].weight, block[0].bias, extra)]
    for p in (block[0].weight, block[0].bias, extra):
        p.grad = torch.randn_like(p)
    opt.step()
    assert not any(torch.equal(b, p) for b, p in zip(before, (block[0].weight, block[0].bias, extra)))
    # an optimizer the constructor did not need is created by the first group that needs it
    only_adam = DualizeAdamW(mm.adapt(nn.Sequential(nn.Embedding(5, 4))))
    assert only_adam.dualize_retract is None
    only_adam.add_param_group({"params": [block[0].weight]})
    assert only_adam.dualize_retract.param_groups[0]["params"] == [block[0].weight]


_SCHEDULERS = {
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.2, 0.01], total_steps=8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)], milestones=[2]),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
def test_dualize_adamw_schedulers_drive_both_inner_optimizers(name):
    """The lr and momentum each inner optimizer applies at every step (read by its own step hook) are
    what the same scheduler gives an SGD with the same groups (AdamW's momentum is its beta1)."""
    model = _emb_mlp()
    opt = DualizeAdamW(mm.adapt(model), lr=0.1, adamw_lr=3e-3, momentum=0.95, adamw_betas=(0.9, 0.99))
    assert [(g["lr"], g["momentum"]) for g in opt.param_groups] == [(0.1, 0.95), (3e-3, 0.9)]
    ref = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": g["lr"], "momentum": g["momentum"]}
                           for g in opt.param_groups])
    applied = {"dual": [], "adamw": []}
    opt.dualize_retract.register_step_pre_hook(
        lambda o, *_: applied["dual"].append((o.param_groups[0]["lr"], o.param_groups[0]["momentum"])))
    opt.adamw.register_step_pre_hook(
        lambda o, *_: applied["adamw"].append((o.param_groups[0]["lr"], o.param_groups[0]["betas"][0])))
    sched, ref_sched, expected = _SCHEDULERS[name](opt), _SCHEDULERS[name](ref), []
    for step in range(7):
        expected.append([(g["lr"], g["momentum"]) for g in ref.param_groups])
        _train_step(model, opt, step)
        ref.step()
        sched.step()
        ref_sched.step()
    def flat(pairs):  # pytest.approx takes flat sequences only (9.2 refuses nested tuples)
        return [v for pair in pairs for v in pair]
    assert flat(applied["dual"]) == pytest.approx(flat(e[0] for e in expected))
    assert flat(applied["adamw"]) == pytest.approx(flat(e[1] for e in expected))
    assert len({e[0] for e in expected}) > 1  # the schedule did move
    assert opt.adamw.param_groups[0]["betas"][1] == 0.99


def test_dualize_adamw_step_and_state_dict_hooks_run_as_on_torch_optimizers():
    model = _emb_mlp()
    opt = DualizeAdamW(mm.adapt(model))
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "note"})
    for step in range(2):
        _train_step(model, opt, step)
    assert calls == [("pre", opt), ("post", opt)] * 2
    pre.remove()
    _train_step(model, opt, 2)
    assert calls[-2:] == [("post", opt), ("post", opt)]
    sd = opt.state_dict()
    assert sd["note"] == 1
    opt.load_state_dict(sd)


@pytest.mark.parametrize("manifolds", ["muon", "hetero"])
def test_dualize_adamw_state_dict_round_trip_continues_bit_identically(manifolds):
    import copy
    import io
    import warnings

    model = _emb_mlp()
    opt = DualizeAdamW(mm.adapt(model, manifolds), weight_decay=0.01, adamw_weight_decay=0.01)
    model(torch.tensor([1, 2])).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    for step in range(3):
        _train_step(model, opt, step)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # as a checkpoint would: no tensors shared with opt
    twin = copy.deepcopy(model)
    opt2 = DualizeAdamW(mm.adapt(twin, manifolds), weight_decay=0.01, adamw_weight_decay=0.01)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert opt2.skipped_steps == opt.skipped_steps == 1
    assert opt2.param_groups[1]["momentum"] == opt.param_groups[1]["momentum"]  # beta1 alias after the load
    for step in range(3, 6):
        _train_step(model, opt, step)
        _train_step(twin, opt2, step)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ------------------------------------------------------------------------------------ HC wrapper
def test_hyper_connections_around_any_module_reduce_to_a_residual():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    with pytest.raises(TypeError):
        mm.compounds.hyper.HyperConnections(lambda u: u, streams=1, width=8)
    direct = mm.compounds.hyper.HyperConnections(lin, streams=2)  # an nn.Module branch is adapted
    assert direct.width == 8 and direct(expand_streams(torch.randn(3, 8), 2)).shape == (3, 2, 8)
    x = torch.randn(2, 5, 8)
    hc = hyper_connections(lin, streams=1, dynamic=False, constrained=False)  # HC: h_pre = h_post = 1
    assert hc.width == 8  # inferred from the LayerNorm
    torch.testing.assert_close(reduce_streams(hc(expand_streams(x, 1))), x + lin(x))
    # mHC with one stream: h_pre = σ(0) = 1/2 in front of the scale-invariant LayerNorm (up to its eps)
    mhc = hyper_connections(lin, streams=1, dynamic=False)
    torch.testing.assert_close(reduce_streams(mhc(expand_streams(x, 1))), x + lin(x), rtol=1e-3, atol=1e-3)
    # n streams: shapes, and the branch's parameters are views the optimizer steps
    hc4 = hyper_connections(lin, streams=4)
    y = hc4(expand_streams(x, 4))
    assert y.shape == (2, 5, 4, 8)
    opt = mm.optim.DualizeRetract(hc4, lr=0.1)
    before = lin[1].weight.detach().clone()
    y.square().mean().backward()
    opt.step()
    assert not torch.equal(before, lin[1].weight)


def test_gpt2_blocks_become_mhc_blocks_and_train(chars):
    """An existing GPT-2's blocks wrapped in mHC in a few lines (examples/adapt_gpt2.py), trained by
    DualizeRetract on the adapted whole (the native mHC atoms keep their own manifolds)."""
    example = _load_example("adapt_gpt2")
    model = tiny_gpt2(vocab=chars.vocab)
    hc_model = example.MHCGPT2(model, streams=2)
    net = mm.adapt(hc_model)
    assert any(a.manifold.name == "birkhoff" for a in net.atoms()) or any(
        getattr(a, "role", "") == "hyper_phi" for a in net.atoms())
    opt = mm.optim.DualizeRetract(net, lr=0.1)
    losses = []
    for step in range(6):
        loss = M.lm_loss(hc_model, chars.train(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_adapt_gpt2_runs(tmp_path, capsys):
    hf()
    _load_example("adapt_gpt2").main(["--steps", "3", "--width", "32", "--context", "16", "--batch", "4",
                                      "--save", str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    assert "norm coef" in out and "step 3" in out
    assert (tmp_path / "ckpt" / "config.json").exists()


# ------------------------------------------------------------------------------------ proof: vs AdamW
def _compare(build, data, loss_fn, steps, adam_lrs, dual_lrs):
    _, (adam_lr, adam) = M.best_of("adamw", build, adam_lrs, data, loss_fn, steps)
    _, (dual_lr, dual) = M.best_of("dualize", build, dual_lrs, data, loss_fn, steps)
    return adam, dual, adam_lr, dual_lr


# Default tier: two-point grids around each optimizer's measured optimum at these sizes (the full
# grids, and these runs' numbers, are in the slow tests and docs/results.md).
GRIDS = {"gpt2": ((3e-3, 1e-2), (0.1, 0.2)), "llama": ((3e-3, 1e-2), (0.1, 0.2)),
         "resnet": ((0.01, 0.03), (0.2, 0.4))}
FULL_GRIDS = {"gpt2": ((1e-3, 3e-3, 1e-2, 3e-2), (0.05, 0.1, 0.2, 0.4)),
              "llama": ((1e-3, 3e-3, 1e-2, 3e-2), (0.05, 0.1, 0.2, 0.4)),
              "resnet": ((3e-3, 0.01, 0.03, 0.1), (0.1, 0.2, 0.4, 0.8))}


def _transformer_case(arch, chars, full):
    hf()
    make = M.gpt2 if arch == "gpt2" else M.llama
    build = lambda: make(chars.vocab, width=32, depth=2, heads=4, context=32)
    adam_lrs, dual_lrs = (FULL_GRIDS if full else GRIDS)[arch]
    adam, dual, adam_lr, dual_lr = _compare(build, chars, M.lm_loss, 60 if full else 30, adam_lrs, dual_lrs)
    assert dual <= adam, f"{arch}: adapt+DualizeRetract {dual:.4f} (lr {dual_lr}) vs AdamW {adam:.4f} (lr {adam_lr})"


def _resnet_case(full):
    data = M.ImageBatches(batch=16, noise=3.0, size=8)
    build = lambda: M.ResNet(width=8, blocks=1)
    net = mm.adapt(build())
    assert net.recovered and "residual" in net.structure_summary
    assert {v.role for v in net.atoms()} == {"conv", "norm_gain", "bias", "head"}
    adam_lrs, dual_lrs = (FULL_GRIDS if full else GRIDS)["resnet"]
    adam, dual, adam_lr, dual_lr = _compare(build, data, M.cls_loss, 80 if full else 40, adam_lrs, dual_lrs)
    assert dual <= adam, f"ResNet: adapt+DualizeRetract {dual:.4f} (lr {dual_lr}) vs AdamW {adam:.4f} (lr {adam_lr})"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_transformers_train_no_worse_than_adamw(arch, chars):
    _transformer_case(arch, chars, full=False)


def test_resnet_with_batchnorm_trains_no_worse_than_adamw():
    _resnet_case(full=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama", "resnet"])
def test_no_worse_than_adamw_full_grids(arch, chars):
    if arch == "resnet":
        _resnet_case(full=True)
    else:
        _transformer_case(arch, chars, full=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lr_transfer_across_a_4x_width_sweep(arch):
    """The loss-optimal lr moves by at most one factor-2 grid step from width 16 to 64."""
    hf()
    lrt = _load_example("adapt_lr_transfer")
    result = lrt.sweep(arch, widths=(16, 32, 64), lrs=(0.025, 0.05, 0.1, 0.2, 0.4), steps=150)
    best = [result["best"][str(w)] for w in (16, 32, 64)]
    shifts = [abs(math.log2(b / best[0])) for b in best]
    assert max(shifts) <= 1 + 1e-9, result


def test_lr_transfer_script_runs_tiny(tmp_path):
    hf()
    lrt = _load_example("adapt_lr_transfer")
    res = lrt.main(["--arch", "gpt2", "--widths", "16", "32", "--lrs", "0.1", "0.2", "--steps", "2",
                    "--context", "8", "--batch", "2", "--out", str(tmp_path)])
    assert set(res["gpt2 dualize"]["best"]) == {"16", "32"}
    assert (tmp_path / "adapt_lr_transfer.png").stat().st_size > 0
    assert "best lr" in (tmp_path / "adapt_lr_transfer.md").read_text()


def test_dualize_adamw_global_step_hooks_fire_once_per_step():
    """torch.optim's global step hooks see one optimizer step per DualizeAdamW.step (they fired for
    the wrapper and for each inner optimizer: three times); the inner optimizers' own hooks still run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = _emb_mlp()
    opt = DualizeAdamW(mm.adapt(model))
    seen, inner = [], []
    opt.adamw.register_step_pre_hook(lambda o, args, kwargs: inner.append("adamw"))
    handles = [register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", type(o).__name__))),
               register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", type(o).__name__)))]
    try:
        before = [p.detach().clone() for p in model.parameters()]
        _train_step(model, opt, 0)
    finally:
        for h in handles:
            h.remove()
    assert seen == [("pre", "DualizeAdamW"), ("post", "DualizeAdamW")]
    assert inner == ["adamw"]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # both inner steps ran
