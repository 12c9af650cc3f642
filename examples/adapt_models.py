"""Models nobody here wrote, and one training loop, for the ``adapt`` proofs (docs/adapt.md).

* ``gpt2(width, depth, ...)`` / ``llama(width, depth, ...)``: Hugging Face transformers built from
  small configs (no download), dropout off.
* ``ResNet``: a small ResNet-like conv net with BatchNorm (BasicBlocks in ``layer1..3``).
* ``train(model, make_optimizer, batches, loss_fn, steps)``: the mean loss over the last 10% of
  steps (and the eval loss on held-out batches when given).
* ``char_batches`` / ``image_batches``: tinyshakespeare characters (../shared/data, or any text)
  and a synthetic image task.

Used by tests/test_adapt.py, examples/adapt_gpt2.py and examples/adapt_lr_transfer.py.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")


# ------------------------------------------------------------------------------------ data
def load_text(path=None, max_chars=300_000):
    """tinyshakespeare (../shared/data beside the repository) or ``path``; a small synthetic text if
    neither exists."""
    path = path or SHAKESPEARE
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read(max_chars)
    g = torch.Generator().manual_seed(0)
    words = ["the ", "king ", "and ", "queen ", "of ", "rome ", "said ", "\n", "to ", "my ", "lord ", "."]
    return "".join(words[i] for i in torch.randint(0, len(words), (40_000,), generator=g).tolist())


class CharBatches:
    """Character batches: ``vocab``, ``train(step)`` (deterministic per step) and ``val()`` batches."""

    def __init__(self, text, context=64, batch=16, seed=0, val_batches=4):
        chars = sorted(set(text))
        self.vocab = len(chars)
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(ids))
        self.train_ids, self.val_ids = ids[:n], ids[n:]
        self.context, self.batch, self.seed = context, batch, seed
        self._val = [self._window(self.val_ids, 10_000 + i) for i in range(val_batches)]

    def _window(self, ids, step):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        start = torch.randint(0, len(ids) - self.context - 1, (self.batch,), generator=g)
        x = torch.stack([ids[s:s + self.context + 1] for s in start.tolist()])
        return x[:, :-1], x[:, 1:]

    def train(self, step):
        return self._window(self.train_ids, step)

    def val(self):
        return self._val


class ImageBatches:
    """A synthetic 10-class image task: class templates (smooth random 3×16×16 patterns) plus
    noise; deterministic per step. Validation uses batch statistics (``eval_mode = False``)."""

    eval_mode = False

    def __init__(self, classes=10, size=16, batch=32, noise=1.0, seed=0, val_batches=4):
        g = torch.Generator().manual_seed(1234)
        t = torch.randn(classes, 3, size // 4, size // 4, generator=g)
        self.templates = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        self.classes, self.batch, self.noise, self.seed = classes, batch, noise, seed
        self._val = [self._make(10_000 + i) for i in range(val_batches)]

    def _make(self, step):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        y = torch.randint(0, self.classes, (self.batch,), generator=g)
        x = self.templates[y] + self.noise * torch.randn(self.batch, *self.templates.shape[1:], generator=g)
        return x, y

    def train(self, step):
        return self._make(step)

    def val(self):
        return self._val


# ------------------------------------------------------------------------------------ models
def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def gpt2(vocab, width=64, depth=2, heads=4, context=64, seed=0):
    """Hugging Face GPT2LMHeadModel from a config (tied embedding/head, Conv1D, fused c_attn)."""
    tr = _quiet_transformers()
    torch.manual_seed(seed)
    cfg = tr.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=depth, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tr.GPT2LMHeadModel(cfg)


def llama(vocab, width=64, depth=2, heads=4, context=64, seed=0):
    """Hugging Face LlamaForCausalLM from a config (RMSNorm gains, SwiGLU, GQA with heads/2 kv heads)."""
    tr = _quiet_transformers()
    torch.manual_seed(seed)
    cfg = tr.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(8 * width / 3) // 8 * 8,
                         num_hidden_layers=depth, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=context,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return tr.LlamaForCausalLM(cfg)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (1×1 conv + bn when the shape changes)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """A small ResNet: stem conv-bn, three stages of ``blocks`` BasicBlocks (width, 2·width, 2·width),
    global average pooling, a Linear classifier."""

    def __init__(self, width=16, blocks=1, classes=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 2 * width)):
            layers = [BasicBlock(cin, cout, 1 if i == 0 else 2)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------ training
def lm_loss(model, batch):
    x, y = batch
    logits = model(x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def cls_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train(model, optimizer, data, loss_fn, steps):
    """Train ``steps`` steps; returns {"train": mean loss of the last 10% of steps, "val": mean loss on
    data.val(), "diverged": bool}. The validation pass runs in eval mode unless ``data.eval_mode`` is
    False (BatchNorm nets after a few steps: running statistics lag the weights, batch statistics
    are the fair measure for every optimizer)."""
    model.train()
    tail, losses = max(1, steps // 10), []
    for step in range(steps):
        loss = loss_fn(model, data.train(step))
        if not torch.isfinite(loss):
            return {"train": math.inf, "val": math.inf, "diverged": True}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.train(not getattr(data, "eval_mode", True))
    with torch.no_grad():
        val = sum(float(loss_fn(model, b)) for b in data.val()) / len(data.val())
    model.train()
    if not math.isfinite(val):
        return {"train": math.inf, "val": math.inf, "diverged": True}
    return {"train": sum(losses[-tail:]) / tail, "val": val, "diverged": False}


def make_optimizer(kind, model, lr, manifolds="muon"):
    """("adamw" | "dualize" | "dualize+adamw", model, lr) → (optimizer, the module trained)."""
    import modula_mhc as mm
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0), model
    net = mm.adapt(model, manifolds)
    if kind == "dualize":
        return mm.optim.DualizeRetract(net, lr=lr), net
    if kind == "dualize+adamw":
        return mm.adapt.DualizeAdamW(net, lr=lr, adamw_lr=3e-3), net
    raise ValueError(kind)


def best_of(kind, build, lrs, data, loss_fn, steps, manifolds="muon", key="val"):
    """{lr: result} for a fresh model per lr, and the best (lr, loss)."""
    results = {}
    for lr in lrs:
        model = build()
        opt, _ = make_optimizer(kind, model, lr, manifolds)
        results[lr] = train(model, opt, data, loss_fn, steps)
    best = min(results, key=lambda k: results[k][key])
    return results, (best, results[best][key])
