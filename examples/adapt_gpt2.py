"""Bring your own model: a Hugging Face GPT-2 trained with modula_mhc's dualize-then-retract step.

    python examples/adapt_gpt2.py                          # Hetero manifolds, tinyshakespeare
    python examples/adapt_gpt2.py --manifolds muon --adamw # Muon habit: embeddings/head/1-D on AdamW
    python examples/adapt_gpt2.py --mhc 4                  # every block's two branches under mHC

The model is built from a config (no download) and never edited: ``mm.adapt`` puts atom views on
its own parameters, ``describe()`` prints what was inferred, and ``save_pretrained`` writes a
normal Hugging Face checkpoint. ``MHCGPT2`` shows the HC wrapper: the model's own modules, wired
as mHC blocks in a few lines. Guide: docs/adapt.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapt_models as M

import modula_mhc as mm
from modula_mhc.adapt import expand_streams, hyper_connections, reduce_streams


class MHCGPT2(nn.Module):
    """A GPT2LMHeadModel's own modules as an mHC network: embeddings → expand to n streams → per
    block mHC(ln_1 → attn), mHC(ln_2 → mlp) → mean of the streams → ln_f → the (tied) head.
    ``options`` go to HyperConnections (``constrained=False`` for HC, ``dynamic=False`` …)."""

    def __init__(self, gpt2, streams=4, **options):
        super().__init__()
        t = gpt2.transformer
        self.wte, self.wpe, self.streams = t.wte, t.wpe, streams  # registration order = execution order
        options.setdefault("depth", 2 * len(t.h))  # the library's depth scaling (docs/adapt.md)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": hyper_connections([blk.ln_1, blk.attn], streams=streams, **options),
                           "mlp": hyper_connections([blk.ln_2, blk.mlp], streams=streams, **options)})
            for blk in t.h)
        self.ln_f, self.lm_head = t.ln_f, gpt2.lm_head

    def forward(self, idx):
        pos = torch.arange(idx.shape[-1], device=idx.device)
        x = expand_streams(self.wte(idx) + self.wpe(pos), self.streams)
        for b in self.blocks:
            x = b["mlp"](b["attn"](x))
        logits = self.lm_head(self.ln_f(reduce_streams(x)))
        return type("Output", (), {"logits": logits})()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="text file (default: ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--manifolds", default="hetero")
    ap.add_argument("--adamw", action="store_true", help="embeddings, head and 1-D parameters on AdamW")
    ap.add_argument("--mhc", type=int, default=0, metavar="N", help="wrap every branch in mHC with N streams")
    ap.add_argument("--save", default=None, help="save_pretrained directory")
    args = ap.parse_args(argv)

    data = M.CharBatches(M.load_text(args.data), context=args.context, batch=args.batch)
    model = M.gpt2(data.vocab, width=args.width, depth=args.depth, heads=args.heads, context=args.context)
    trained = MHCGPT2(model, streams=args.mhc, manifolds=args.manifolds) if args.mhc else model

    net = mm.adapt(trained, args.manifolds)          # 1. atom views on the model's own parameters
    net.describe()                                   #    what was inferred
    opt = (mm.adapt.DualizeAdamW(net, lr=args.lr) if args.adamw
           else mm.optim.DualizeRetract(net, lr=args.lr))  # 2. the optimizer

    t0 = time.time()
    for step in range(1, args.steps + 1):            # 3. an ordinary training loop
        loss = M.lm_loss(trained, data.train(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step}: loss {float(loss.detach()):.4f}  ({time.time() - t0:.1f}s)")
    with torch.no_grad():
        val = sum(float(M.lm_loss(trained, b)) for b in data.val()) / len(data.val())
    print(f"val loss {val:.4f}")
    if args.save:
        model.save_pretrained(args.save)             # a normal Hugging Face checkpoint
        print(f"saved to {args.save}")
    return val


if __name__ == "__main__":
    main()
