"""The manifold study: which manifold for which layer? (Yoshihara 2026, "Different Layers,
Different Manifolds", on a small character-level GPT.)

Trains the same GPT with the same hyperparameters under five manifold presets:

    muon         attention Euclidean, MLP Euclidean   (Muon: spectral-norm steps, no constraint)
    all-stiefel  attention Stiefel,   MLP Stiefel
    hetero       attention Stiefel,   MLP DGram
    hetero-inv   attention DGram,     MLP Stiefel
    all-dgram    attention DGram,     MLP DGram

and records validation loss and the top singular value of the attention Q and K weights over
training: DGram frees the column norms, so Q/K can grow, the attention logits q·k/d grow with
σ_Q·σ_K and softmax saturates (the paper's explanation of DGram-on-attention instability).

    python examples/manifold_study.py                          # default size
    python examples/manifold_study.py --steps 300 --presets muon hetero

Outputs (in --out, default runs/examples; --out docs/figures regenerates the committed ones): manifold_study.png, manifold_study.json, manifold_study.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modula_mhc import compounds  # noqa: E402
from modula_mhc.optim.presets import PRESETS  # noqa: E402  (preset → attention, MLP, other manifold)

import _common as C  # noqa: E402

#: the presets the study compares, in the paper's order
STUDIED = ("muon", "all-stiefel", "hetero", "hetero-inv", "all-dgram")
#: the paper's numbers (GPT-2 small, OpenWebText), for the table; None = reported unstable
PAPER = {"muon": "3.3855", "all-stiefel": "3.3679", "hetero": "3.3544", "hetero-inv": "unstable",
         "all-dgram": "unstable"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=STUDIED, default=list(STUDIED))
    C.add_gpt_study_arguments(p, depth=2, steps=1000, eval_every=100)
    p.add_argument("--attn-temperature", type=float, default=1.0,
                   help="attention logits τ·q·k/d (default 1): lets Stiefel attention (σ(Q/K) = 1) sharpen")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. _tau8)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per preset (default 1)")
    p.add_argument("--dual-max-iters", type=int, default=10,
                   help="cap on the Stiefel/DGram dual-ascent iterations per step (default 10: warm-started, "
                        "it is the CPU cost that dominates; the library default is 100)")
    p.add_argument("--dual-tol", type=float, default=1e-3, help="certified relative duality gap of each dualize (default 1e-3)")
    p.add_argument("--sv-every", type=int, default=25, help="record Q/K singular values every N steps")
    args = p.parse_args(argv)
    C.check_gpt_study_arguments(p, args, positive=("seeds", "sv_every", "dual_max_iters"))
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.warmup >= args.steps:  # as `modula-mhc train`: a warmup as long as the run never reaches the peak lr
        p.error(f"--warmup must be smaller than --steps ({args.steps}), got {args.warmup}")
    if not args.dual_tol > 0:
        p.error(f"--dual-tol must be > 0, got {args.dual_tol}")
    if not args.attn_temperature > 0:
        p.error(f"--attn-temperature must be > 0, got {args.attn_temperature}")
    return args


@torch.no_grad()
def qk_singular_values(model):
    """Top singular value of the effective map of every attention Q and K weight (stored weight
    times the atom's fixed gain, which is 1 for these square maps), as a list."""
    out = []
    for atom in model.atoms():
        if atom.role in ("attn_q", "attn_k"):
            sigma = torch.linalg.matrix_norm(atom.weight.float(), ord=2).item()
            out.append(sigma * float(getattr(atom, "gain", 1.0)))
    return out


def manifold(name, args):
    """A manifold instance; Stiefel and DGram get the study's dual-ascent settings."""
    from modula_mhc import manifolds
    if name == "euclidean":
        return manifolds.get(name)
    return type(manifolds.get(name))(gap_tol=args.dual_tol, max_iters=args.dual_max_iters)


def train_preset(preset, seed, corpus, val, args):
    from modula_mhc import optim
    attn_m, mlp_m = (manifold(m, args) for m in PRESETS[preset][:2])
    gen = C.set_seed(seed)
    model = compounds.GPT(corpus.vocab_size, args.context, args.width, args.depth, args.heads,
                          attn_manifold=attn_m, mlp_manifold=mlp_m, attn_temperature=args.attn_temperature)
    opt = optim.DualizeRetract(model, lr=args.lr, momentum=0.95, nesterov=True)
    sv = {"step": [0], "max": [max(qk_singular_values(model))], "dual_iterations": []}

    def watch(step, model, optimizer, record):
        if step % args.sv_every == 0:
            sv["step"].append(step)
            sv["max"].append(max(qk_singular_values(model)))
            iters = [d["iterations"] for d in optimizer.diagnostics().values() if "iterations" in d]
            sv["dual_iterations"].append(sum(iters) / len(iters) if iters else 0)

    rec = C.run(model, opt, args.steps, C.gpt_batches(corpus, "train", args.batch, args.context, gen), args.lr,
                val_batches=val, eval_every=args.eval_every, warmup=args.warmup, callback=watch,
                progress=args.progress, desc=preset)
    rec["qk_sigma_max"] = sv
    print(f"{preset} seed {seed}: val {rec['val_loss']:.4f}, max σ(Q/K) {sv['max'][-1]:.3g}, "
          f"{rec['seconds']:.0f}s{' (diverged)' if rec['diverged'] else ''}", flush=True)
    return rec


def plot(path, runs, args):
    plt = C.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for k, (preset, recs) in enumerate(runs.items()):
        color = plt.get_cmap("tab10")(k)
        for j, rec in enumerate(recs):
            label = preset if j == 0 else None
            if rec["losses"]:
                ax1.plot(range(1, len(rec["losses"]) + 1), C.smooth(rec["losses"], 25), color=color, alpha=0.35, lw=0.8)
            steps, vals = zip(*rec["evals"]) if rec["evals"] else ((), ())
            ax1.plot(steps, vals, "o-", color=color, ms=3, label=label)
            ax2.plot(rec["qk_sigma_max"]["step"], rec["qk_sigma_max"]["max"], color=color, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/char): val dots, train smoothed")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("max top singular value, attention Q/K")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.suptitle(f"GPT width {args.width}, {args.depth} blocks, lr {args.lr}, {args.steps} steps", fontsize=10)
    C.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = C.load_corpus(args.data, args.context)
    val = C.fixed_batches(C.gpt_batches(corpus, "val", args.batch, args.context, torch.Generator().manual_seed(0)),
                          args.val_batches)
    runs = {p: [train_preset(p, s, corpus, val, args) for s in range(args.seeds)] for p in args.presets}
    rows, summary = [], {}
    for preset, recs in runs.items():
        finals = [r["val_loss"] for r in recs]
        best = [min(v for _, v in r["evals"]) if r["evals"] else math.inf for r in recs]
        sig = [r["qk_sigma_max"]["max"][-1] for r in recs]
        mean = sum(finals) / len(finals)
        summary[preset] = dict(attention=PRESETS[preset][0], mlp=PRESETS[preset][1], final_val=finals,
                               best_val=best, final_qk_sigma_max=sig, diverged=[r["diverged"] for r in recs],
                               seconds=[r["seconds"] for r in recs])
        rows.append([preset, PRESETS[preset][0], PRESETS[preset][1],
                     "diverged" if not math.isfinite(mean) else f"{mean:.4f}",
                     f"{min(best):.4f}" if math.isfinite(min(best)) else "—",
                     f"{max(sig):.3g}", f"{sum(r['seconds'] for r in recs) / len(recs):.0f}", PAPER[preset]])
    header = ["preset", "attention", "MLP", f"final val loss (mean of {args.seeds} seed(s))", "best val loss",
              "final max σ(Q/K)", "seconds/run", "paper (GPT-2 small)"]
    md = f"Command: `{C.command_line()}`\n\n" + C.markdown_table(header, rows)
    C.write_text(os.path.join(args.out, f"manifold_study{args.tag}.md"), md)
    C.write_json(os.path.join(args.out, f"manifold_study{args.tag}.json"),
                 dict(config=dict(vars(args), command=C.command_line(), data=corpus.source), summary=summary,
                      runs={p: [dict(evals=r["evals"], qk_sigma_max=r["qk_sigma_max"], diverged=r["diverged"],
                                     losses=r["losses"][::10]) for r in recs] for p, recs in runs.items()}))
    plot(os.path.join(args.out, f"manifold_study{args.tag}.png"), runs, args)
    print(md)


if __name__ == "__main__":
    main()
