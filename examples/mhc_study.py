"""The mHC study: plain residual vs hyper-connections (HC) vs manifold-constrained HC (mHC).

Trains the same character-level GPT three times (residual="plain", "hc", "mhc" with n streams)
with the same optimizer and learning rate, and records over training:
  - train and validation loss,
  - the global gradient norm,
  - the composite forward and backward gains of the residual mixing H_res^(L)⋯H_res^(1)
    (``compounds.stability_report``: max row-sum and max column-sum of |composite|, the ℓ∞ and
    ℓ1 operator norms; 1 for any product of doubly-stochastic matrices).

    python examples/mhc_study.py
    python examples/mhc_study.py --steps 200 --residuals plain mhc

Outputs (in --out, default runs/examples; --out docs/figures regenerates the committed ones): mhc_study.png, mhc_study.json, mhc_study.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modula_mhc import compounds  # noqa: E402
from modula_mhc.optim.presets import PRESETS as MANIFOLD_PRESETS  # noqa: E402  (attn, mlp, other)

import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--residuals", nargs="+", choices=["plain", "hc", "mhc"], default=["plain", "hc", "mhc"])
    p.add_argument("--streams", type=int, default=4, help="residual streams n for HC/mHC (default 4)")
    C.add_gpt_study_arguments(p, depth=4, steps=500, eval_every=50)
    p.add_argument("--manifolds", choices=sorted(MANIFOLD_PRESETS), default="muon",
                   help="manifold preset of the weights (default muon: the residual is what varies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gain-every", type=int, default=25, help="stability report every N steps (default 25)")
    args = p.parse_args(argv)
    C.check_gpt_study_arguments(p, args, positive=("streams", "gain_every"))
    return args


def gains(model, residual, probe):
    """(composite forward gain, composite backward gain, max Sinkhorn marginal error) on ``probe``
    tokens; (1, 1, None) for a plain residual, whose mixing is the identity."""
    if residual == "plain":
        return 1.0, 1.0, None
    rep = compounds.stability_report(model, batch=probe)
    return rep["final_composite_forward_gain"], rep["final_composite_backward_gain"], rep["max_marginal_error"]


def train_residual(residual, corpus, val, probe, args):
    from modula_mhc import optim
    attn_m, mlp_m = MANIFOLD_PRESETS[args.manifolds][:2]
    gen = C.set_seed(args.seed)
    kw = dict(streams=args.streams) if residual != "plain" else {}
    model = compounds.GPT(corpus.vocab_size, args.context, args.width, args.depth, args.heads, residual=residual,
                          attn_manifold=attn_m, mlp_manifold=mlp_m, **kw)
    opt = optim.DualizeRetract(model, lr=args.lr, momentum=0.95, nesterov=True)
    f0, b0, e0 = gains(model, residual, probe)
    track = {"step": [0], "forward": [f0], "backward": [b0], "marginal_error": [e0]}

    def watch(step, model, optimizer, record):
        if step % args.gain_every == 0 or step == args.steps:
            f, b, e = gains(model, residual, probe)
            track["step"].append(step)
            track["forward"].append(f)
            track["backward"].append(b)
            track["marginal_error"].append(e)

    rec = C.run(model, opt, args.steps, C.gpt_batches(corpus, "train", args.batch, args.context, gen), args.lr,
                val_batches=val, eval_every=args.eval_every, callback=watch, progress=args.progress, desc=residual)
    rec["gains"] = track
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    print(f"{residual}: val {rec['val_loss']:.4f}, composite gains fwd max {max(track['forward']):.4g} "
          f"bwd max {max(track['backward']):.4g}, {rec['seconds']:.0f}s", flush=True)
    return rec


def plot(path, runs, args):
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {"plain": "tab:gray", "hc": "tab:red", "mhc": "tab:blue"}
    names = {"plain": "plain residual", "hc": f"HC (n={args.streams})", "mhc": f"mHC (n={args.streams})"}
    for residual, rec in runs.items():
        c = colors[residual]
        if rec["losses"]:
            axes[0].plot(range(1, len(rec["losses"]) + 1), C.smooth(rec["losses"], 25), color=c, alpha=0.4, lw=0.8)
        if rec["evals"]:
            s, v = zip(*rec["evals"])
            axes[0].plot(s, v, "o-", color=c, ms=3, label=names[residual])
        axes[1].plot(rec["gains"]["step"], rec["gains"]["forward"], "-", color=c, label=f"{names[residual]} fwd")
        axes[1].plot(rec["gains"]["step"], rec["gains"]["backward"], "--", color=c, label=f"{names[residual]} bwd")
        if rec["grad_norms"]:
            axes[2].plot(range(1, len(rec["grad_norms"]) + 1), C.smooth(rec["grad_norms"], 10), color=c,
                         label=names[residual])
    axes[0].set(xlabel="step", ylabel="loss (nats/char): val dots, train smoothed")
    axes[1].set(xlabel="step", ylabel="composite H_res gain (max row / column abs sum)")
    axes[2].set(xlabel="step", ylabel="gradient norm (smoothed)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"GPT width {args.width}, {args.depth} blocks, {args.manifolds} manifolds, lr {args.lr}, "
                 f"{args.steps} steps", fontsize=10)
    C.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = C.load_corpus(args.data, args.context)
    val = C.fixed_batches(C.gpt_batches(corpus, "val", args.batch, args.context, torch.Generator().manual_seed(0)),
                          args.val_batches)
    probe = val[0][0][:4]  # four validation sequences: the gains are measured on real text
    runs = {r: train_residual(r, corpus, val, probe, args) for r in args.residuals}
    header = ["residual", "parameters", "final val loss", "best val loss", "composite fwd gain (max over training)",
              "composite bwd gain (max over training)", "final fwd / bwd gain", "median grad norm", "seconds"]
    rows = []
    for residual, rec in runs.items():
        g = rec["gains"]
        best = min((v for _, v in rec["evals"]), default=math.inf)
        norms = sorted(rec["grad_norms"])
        rows.append([residual, f"{rec['parameters']:,}",
                     f"{rec['val_loss']:.4f}" if math.isfinite(rec["val_loss"]) else "diverged", f"{best:.4f}",
                     f"{max(g['forward']):.4g}", f"{max(g['backward']):.4g}",
                     f"{g['forward'][-1]:.4g} / {g['backward'][-1]:.4g}",
                     f"{norms[len(norms) // 2]:.3g}" if norms else "—", f"{rec['seconds']:.0f}"])
    md = f"Command: `{C.command_line()}`\n\n" + C.markdown_table(header, rows)
    C.write_text(os.path.join(args.out, "mhc_study.md"), md)
    C.write_json(os.path.join(args.out, "mhc_study.json"),
                 dict(config=dict(vars(args), command=C.command_line(), data=corpus.source),
                      runs={r: dict(evals=rec["evals"], gains=rec["gains"], losses=rec["losses"][::10],
                                    grad_norms=rec["grad_norms"][::10], diverged=rec["diverged"],
                                    seconds=rec["seconds"], parameters=rec["parameters"])
                            for r, rec in runs.items()}))
    plot(os.path.join(args.out, "mhc_study.png"), runs, args)
    print(md)


if __name__ == "__main__":
    main()
