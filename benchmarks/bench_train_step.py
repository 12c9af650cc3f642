"""Training-step cost: DualizeRetract (Muon and Hetero manifolds) vs AdamW on the same GPT.

One step = forward + backward + optimizer step on the DESIGN quality setting (width 128, 4 blocks,
4 heads, context 64, batch 12, vocab 65). Methods are interleaved round-robin and the median of
the repeats is reported, so the ratios come from one run on one machine state.
DESIGN CPU target: a DualizeRetract step ≤ 1.2× an AdamW step.

Run: python benchmarks/bench_train_step.py [--width 128 --depth 4 --repeats 15 --threads 1]
Writes benchmarks/results/train_step.json and .png and prints a table.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc import compounds, optim  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make(method, args):
    torch.manual_seed(0)
    manifolds = {"adamw": ("euclidean", "euclidean"), "muon": ("euclidean", "euclidean"),
                 "hetero": ("stiefel", "dgram")}[method]
    gpt = compounds.GPT(vocab_size=65, context=args.context, width=args.width, depth=args.depth, heads=args.heads,
                        attn_manifold=manifolds[0], mlp_manifold=manifolds[1], residual=args.residual)
    if method == "adamw":
        opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    else:
        opt = optim.DualizeRetract(gpt, lr=0.1)
    return gpt, opt


def step(gpt, opt, idx, tgt):
    logits = gpt(idx)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--residual", default="plain")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--methods", nargs="+", default=["adamw", "muon", "hetero"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 65, (args.batch, args.context), generator=g)
    tgt = torch.randint(0, 65, (args.batch, args.context), generator=g)
    runs = {m: make(m, args) for m in args.methods}
    for m in args.methods:  # warm up (first steps allocate state)
        for _ in range(3):
            step(*runs[m], idx, tgt)
    times = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for m in args.methods:
            t = time.perf_counter()
            step(*runs[m], idx, tgt)
            times[m].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    base = med.get("adamw", next(iter(med.values())))
    rows = [{"method": m, "median_ms": 1e3 * med[m], "ratio_vs_adamw": med[m] / base} for m in args.methods]
    print(f"GPT width {args.width}, depth {args.depth}, heads {args.heads}, context {args.context}, "
          f"batch {args.batch}, residual {args.residual}, torch threads {torch.get_num_threads()}")
    print(f"{'method':10s} {'median ms':>10s} {'x AdamW':>8s}")
    for r in rows:
        print(f"{r['method']:10s} {r['median_ms']:10.1f} {r['ratio_vs_adamw']:8.2f}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "train_step.json"), "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([r["method"] for r in rows], [r["ratio_vs_adamw"] for r in rows], color="tab:blue")
        ax.axhline(1.2, color="tab:red", ls="--", label="target 1.2x")
        ax.set_ylabel("step time / AdamW step")
        ax.set_title(f"GPT train step (width {args.width}, depth {args.depth})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "train_step.png"), dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
