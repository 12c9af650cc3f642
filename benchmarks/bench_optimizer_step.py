"""Optimizer step alone, on real training gradients: AdamW, torch's Muon and DualizeRetract with
Euclidean (Muon), Stiefel, DGram and Hetero manifolds, side by side in one run, plus the dual
iterations and certified gap each Stiefel/DGram matrix needed.

Gradients come from a short training run of a GPT (--width, --depth) on text (tinyshakespeare via
--data, else the embedded corpus): after --train-steps Muon steps, --repeats successive batches'
gradients are recorded and every optimizer is stepped on the same sequence (so warm starts see
gradients that change as they do in training).

    python benchmarks/bench_optimizer_step.py --data ../shared/data/tinyshakespeare.txt
    python benchmarks/bench_optimizer_step.py --width 768 --depth 12 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modula_mhc import compounds, optim  # noqa: E402
from modula_mhc.data import CharCorpus, default_corpus, load_text  # noqa: E402
from modula_mhc.optim.presets import PRESETS  # noqa: E402

#: kind → (attention, MLP) manifolds, from the library's preset table
KINDS = {"euclidean": PRESETS["muon"][:2], "stiefel": PRESETS["all-stiefel"][:2], "dgram": PRESETS["all-dgram"][:2],
         "hetero": PRESETS["hetero"][:2]}


def record_gradients(args):
    """Train a Muon GPT for args.train_steps steps, then record args.repeats gradient lists."""
    text = load_text(args.data) if args.data else default_corpus()
    corpus = CharCorpus.from_text(text, 64)
    torch.manual_seed(0)
    gpt = compounds.GPT(corpus.vocab_size, 64, args.width, args.depth, max(1, args.width // 32)).to(args.device)
    opt = optim.DualizeRetract(gpt, lr=0.2)
    g = torch.Generator().manual_seed(1)
    grads = []
    for step in range(args.train_steps + args.repeats):
        x, y = corpus.batch("train", 12, 64, generator=g)
        logits = gpt(x.to(args.device))
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(args.device).reshape(-1)).backward()
        if step >= args.train_steps:
            grads.append([p.grad.detach().clone() for p in gpt.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return gpt, corpus.vocab_size, grads


def build(kind, args, vocab, weights):
    torch.manual_seed(0)
    attn, mlp = KINDS.get(kind, PRESETS["muon"][:2])
    gpt = compounds.GPT(vocab, 64, args.width, args.depth, max(1, args.width // 32),
                        attn_manifold=attn, mlp_manifold=mlp).to(args.device)
    with torch.no_grad():  # start from the trained weights, put back on this kind's manifolds
        for p, w in zip(gpt.parameters(), weights):
            p.copy_(w)
        gpt.retract()
    params = list(gpt.parameters())
    if kind == "adamw":
        return gpt, params, torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if kind == "torch-muon":
        mats = [p for p in params if p.ndim == 2]
        return gpt, mats, torch.optim.Muon(mats, lr=0.02, momentum=0.95, weight_decay=0.0)
    return gpt, params, optim.DualizeRetract(gpt, lr=0.02)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--data", default=None)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kinds", nargs="+", default=["adamw", "torch-muon", "euclidean", "stiefel", "dgram", "hetero"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trained, vocab, grads = record_gradients(args)
    weights = [p.detach().clone() for p in trained.parameters()]
    setups = {k: build(k, args, vocab, weights) for k in args.kinds}
    times = {k: [] for k in args.kinds}
    dual = {k: [] for k in args.kinds}
    for step_grads in grads:  # round-robin: background load hits every optimizer alike
        for kind in args.kinds:
            gpt, params, opt = setups[kind]
            stepped = set(params)
            for p, gr in zip(gpt.parameters(), step_grads):
                p.grad = gr.clone() if p in stepped else None
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - t0)
            if isinstance(opt, optim.DualizeRetract):
                for name, d in opt.diagnostics().items():
                    if d["manifold"] in ("stiefel", "dgram"):
                        dual[kind].append((d["manifold"], d.get("iterations"), d.get("duality_gap")))
            opt.zero_grad(set_to_none=True)
    base = statistics.median(times["adamw"]) if "adamw" in times else None
    rows = []
    print(f"optimizer step, GPT width {args.width} depth {args.depth}, real gradients after "
          f"{args.train_steps} steps, {args.repeats} steps each, {args.device}, threads {torch.get_num_threads()}")
    print(f"{'kind':11s} {'median ms':>9s} {'x AdamW':>8s}  dual iterations (mean, max), worst certified gap")
    for kind in args.kinds:
        med = statistics.median(times[kind])
        its = [i for _, i, _ in dual[kind] if i is not None]
        gaps = [gp for *_, gp in dual[kind] if gp is not None]
        row = {"kind": kind, "median_ms": 1e3 * med, "ratio_vs_adamw": med / base if base else None,
               "dual_iterations_mean": statistics.mean(its) if its else None,
               "dual_iterations_max": max(its) if its else None, "worst_gap": max(gaps) if gaps else None}
        rows.append(row)
        extra = f"{row['dual_iterations_mean']:.1f}, {row['dual_iterations_max']}, {row['worst_gap']:.2e}" if its else ""
        ratio = f"{row['ratio_vs_adamw']:8.2f}" if base else ""
        print(f"{kind:11s} {row['median_ms']:9.1f} {ratio}  {extra}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "optimizer_step.json"), "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
