"""Learning-rate transfer on models nobody here wrote: Hugging Face GPT-2 and Llama (built from
configs), adapted with ``mm.adapt`` and trained by DualizeRetract, across a width sweep.

    python examples/adapt_lr_transfer.py                      # both, widths 16 32 64, 5 lrs
    python examples/adapt_lr_transfer.py --arch gpt2 --steps 300 --adamw

Writes ``<out>/adapt_lr_transfer.json``, a Markdown table and ``adapt_lr_transfer.png`` (val loss
against lr, one curve per width). The claim checked (tests/test_adapt.py, slow): the loss-optimal
lr moves by at most one factor-2 grid step across the 4× width sweep. Results: docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapt_models as M


def sweep(arch, widths=(16, 32, 64), lrs=(0.025, 0.05, 0.1, 0.2, 0.4), steps=150, depth=2, heads=4,
          context=64, batch=16, kind="dualize", manifolds="muon", text=None, seed=0, log=None):
    """{"val": {width: {lr: val loss}}, "best": {width: lr}, "settings": …} (keys are strings)."""
    data = M.CharBatches(text if text is not None else M.load_text(), context=context, batch=batch, seed=seed)
    make = M.gpt2 if arch == "gpt2" else M.llama
    out = {"val": {}, "best": {}, "settings": {"arch": arch, "widths": list(widths), "lrs": list(lrs), "steps": steps,
                                               "depth": depth, "heads": heads, "context": context, "batch": batch,
                                               "kind": kind, "manifolds": manifolds, "seed": seed}}
    for w in widths:
        def build(w=w):
            return make(data.vocab, width=w, depth=depth, heads=heads, context=context, seed=seed)
        res, (best, _) = M.best_of(kind, build, lrs, data, M.lm_loss, steps, manifolds)
        out["val"][str(w)] = {str(lr): r["val"] for lr, r in res.items()}
        out["best"][str(w)] = best
        if log:
            log(f"{arch} {kind} width {w}: " + "  ".join(f"lr {lr:g}: {r['val']:.4f}" for lr, r in res.items())
                + f"  → best {best:g}")
    return out


def table(results) -> str:
    """Markdown: one row per (arch, optimizer, width), val loss per lr, best lr in bold."""
    lines = []
    for key, r in results.items():
        lrs = r["settings"]["lrs"]
        lines.append(f"\n{key} ({r['settings']['steps']} steps, depth {r['settings']['depth']}, "
                     f"context {r['settings']['context']}, batch {r['settings']['batch']}):\n")
        lines.append("| width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |")
        lines.append("|---|" + "---|" * (len(lrs) + 1))
        for w, vals in r["val"].items():
            best = r["best"][w]
            cells = [(f"**{vals[str(lr)]:.4f}**" if lr == best else f"{vals[str(lr)]:.4f}") for lr in lrs]
            lines.append(f"| {w} | " + " | ".join(cells) + f" | {best:g} |")
        b = [r["best"][w] for w in r["val"]]
        shift = max(abs(math.log2(x / b[0])) for x in b)
        lines.append(f"\noptimal lr moves by {shift:g} factor-2 step(s) across the sweep")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items()):
        for w, vals in r["val"].items():
            lrs = [float(x) for x in vals]
            ax.plot(lrs, [min(v, 5.0) for v in vals.values()], marker="o", label=f"width {w}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lr")
        ax.set_ylabel("val loss (nats/char)")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--widths", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.025, 0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--adamw", action="store_true", help="also sweep AdamW (lrs --adamw-lrs)")
    ap.add_argument("--adamw-lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--manifolds", default="muon")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "examples"),
                    help="output folder (default runs/examples, git-ignored; --out docs/figures regenerates the committed ones)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results, t0 = {}, time.time()
    for arch in args.arch:
        runs = [("dualize", args.lrs)] + ([("adamw", args.adamw_lrs)] if args.adamw else [])
        for kind, lrs in runs:
            results[f"{arch} {kind}"] = sweep(arch, args.widths, lrs, args.steps, args.depth, 4, args.context,
                                               args.batch, kind, args.manifolds, log=print)
    with open(os.path.join(args.out, "adapt_lr_transfer.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "adapt_lr_transfer.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    plot(results, os.path.join(args.out, "adapt_lr_transfer.png"))
    print(f"done in {time.time() - t0:.0f}s → {args.out}")
    return results


if __name__ == "__main__":
    main()
