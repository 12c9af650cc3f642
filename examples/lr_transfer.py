"""Learning-rate transfer across width and depth: modula_mhc (dualize-then-retract) vs AdamW.

For each model (an MLP on character n-grams, a character-level GPT), each sweep (width or depth)
and each optimizer, train every size at every learning rate of a factor-2 grid for a few hundred
steps and a few seeds, then record the final validation loss. The optimum learning rate per size
and its drift across the sweep (in factors of 2) are the result: with the modular norm the
optimum should stay put (at most one grid step across 8× width and 8× depth).

    python examples/lr_transfer.py                         # everything, default sizes
    python examples/lr_transfer.py --model mlp --sweep width --optimizer dualize
    python examples/lr_transfer.py --model gpt --sweep depth --steps 100 --seeds 1

Outputs (in --out, default runs/examples; --out docs/figures regenerates the committed ones): lr_transfer_<model>_<sweep>.png (loss vs lr, one panel
per optimizer, one curve per size), .json (every run) and .md (optimum table).

Baseline: AdamW on the same architecture written in plain PyTorch in standard parametrisation
(examples/_baselines.py). The MLP task: predict the next character from the one-hot of the
previous k characters (flattened, scaled to unit RMS).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modula_mhc import compounds  # noqa: E402

import _common as C  # noqa: E402
from _baselines import SPGPT, SPMLP, adamw  # noqa: E402

#: default sizes per (model, sweep): the swept values and the fixed other dimension
DEFAULT_SIZES = {
    ("mlp", "width"): dict(values=[64, 128, 256, 512], fixed=3),      # fixed = depth
    ("mlp", "depth"): dict(values=[2, 4, 8, 16], fixed=128),          # fixed = width
    ("gpt", "width"): dict(values=[16, 32, 64, 128], fixed=2),
    ("gpt", "depth"): dict(values=[2, 4, 8, 16], fixed=32),
}
#: factor-2 learning-rate grids (log2): the modular-norm step size and AdamW's usual range
DEFAULT_LOG2_LRS = {"dualize": list(range(-5, 1)), "adamw": list(range(-10, -4))}
DEFAULT_STEPS = {"mlp": 200, "gpt": 150}
#: --manifolds preset → (attention manifold, MLP manifold, other), as in `modula-mhc train --manifolds`
from modula_mhc.optim.presets import PRESETS as MANIFOLD_PRESETS  # noqa: E402

HEAD_WIDTH = 16  # GPT heads = width / 16, so the head width stays fixed across the width sweep


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=["mlp", "gpt"], default=["mlp", "gpt"])
    p.add_argument("--sweep", nargs="+", choices=["width", "depth"], default=["width", "depth"])
    p.add_argument("--optimizer", nargs="+", choices=["dualize", "adamw"], default=["dualize", "adamw"])
    p.add_argument("--widths", type=int, nargs="+", help="widths of the width sweep (default per model)")
    p.add_argument("--depths", type=int, nargs="+", help="depths of the depth sweep (default per model)")
    p.add_argument("--fixed-depth", type=int, help="depth during the width sweep (MLP 3, GPT 2)")
    p.add_argument("--fixed-width", type=int, help="width during the depth sweep (MLP 128, GPT 32)")
    p.add_argument("--lrs", type=float, nargs="+", help="dualize learning rates (default 2^-5 … 2^0)")
    p.add_argument("--adamw-lrs", type=float, nargs="+", help="AdamW learning rates (default 2^-10 … 2^-5)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (MLP 200, GPT 150)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per (size, lr) (default 2)")
    p.add_argument("--batch", type=int, help="batch size (MLP 128 examples, GPT 16 sequences)")
    p.add_argument("--context", type=int, default=32, help="GPT context length (default 32)")
    p.add_argument("--ngram", type=int, default=8, help="MLP input: previous k characters (default 8)")
    p.add_argument("--manifolds", choices=sorted(MANIFOLD_PRESETS), default="muon",
                   help="manifold preset of the modula_mhc models (default muon: Euclidean, fastest)")
    p.add_argument("--val-batches", type=int, default=8, help="fixed validation batches (default 8)")
    p.add_argument("--data", default=C.default_data_path(),
                   help="UTF-8 text file (default: ../shared/data/tinyshakespeare.txt if present, "
                        "else the embedded corpus)")
    p.add_argument("--out", default=C.OUT, help="output folder (default runs/examples, git-ignored; "
                                               "--out docs/figures regenerates the committed figures)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--progress", action="store_true", help="tqdm bar per run")
    args = p.parse_args(argv)
    for name in ("steps", "seeds", "batch", "context", "ngram", "val_batches", "threads", "fixed_depth",
                 "fixed_width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("widths", "depths", "lrs", "adamw_lrs"):
        v = getattr(args, name)
        if v is not None and min(v) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    if "gpt" in args.model:  # GPT heads = width / HEAD_WIDTH: every GPT width must split into them
        for sweep in args.sweep:
            flag = "--widths" if sweep == "width" else "--fixed-width"
            for width in sorted({w for w, _ in sweep_sizes("gpt", sweep, args)[0]}):
                heads = gpt_heads(width)
                if width % heads:
                    p.error(f"{flag}: the GPT's {heads} heads (width // {HEAD_WIDTH}) must divide its width {width}")
                if "dualize" in args.optimizer and (width // heads) % 2:  # the library's GPT: rotary embedding
                    p.error(f"{flag}: the GPT's head width {width}/{heads} = {width // heads} must be even "
                            f"(rotary embedding)")
    C.check_data(p, args.data, args.context)
    return args


# ------------------------------------------------------------------------------------------ models
def gpt_heads(width):
    """The GPT's number of heads at ``width``: head width HEAD_WIDTH (one head below it)."""
    return max(1, width // HEAD_WIDTH)


def build(model_kind, optimizer, width, depth, vocab, args):
    """(model, torch optimizer factory lr ↦ optimizer) for one run."""
    attn_m, mlp_m = MANIFOLD_PRESETS[args.manifolds][:2]
    if model_kind == "mlp":
        n_in = args.ngram * vocab
        model = SPMLP(n_in, vocab, width, depth) if optimizer == "adamw" else \
            compounds.MLP(n_in, vocab, width, depth, manifold=mlp_m)
    else:
        heads = gpt_heads(width)
        model = SPGPT(vocab, args.context, width, depth, heads) if optimizer == "adamw" else \
            compounds.GPT(vocab, args.context, width, depth, heads, attn_manifold=attn_m, mlp_manifold=mlp_m)
    if optimizer == "adamw":
        return model, lambda lr: adamw(model, lr)
    from modula_mhc import optim
    return model, lambda lr: optim.DualizeRetract(model, lr=lr, momentum=0.95, nesterov=True)


def batches(model_kind, corpus, split, args, generator):
    if model_kind == "mlp":
        return C.mlp_batches(corpus, split, args.batch or 128, args.ngram, generator)
    return C.gpt_batches(corpus, split, args.batch or 16, args.context, generator)


# ------------------------------------------------------------------------------------------ analysis
def optimum(log2_lrs, mean_losses):
    """(grid index of the best lr, refined log2 optimum): the argmin on the grid, then the vertex
    of the parabola through it and its two neighbours (when both exist and are finite)."""
    finite = [i for i, v in enumerate(mean_losses) if math.isfinite(v)]
    if not finite:
        return None, None
    i = min(finite, key=lambda j: mean_losses[j])
    x = log2_lrs[i]
    if 0 < i < len(mean_losses) - 1 and all(math.isfinite(mean_losses[j]) for j in (i - 1, i + 1)):
        a, b, c = mean_losses[i - 1], mean_losses[i], mean_losses[i + 1]
        h = log2_lrs[i + 1] - log2_lrs[i]
        curvature = a - 2 * b + c
        if curvature > 0:
            x = log2_lrs[i] + 0.5 * h * (a - c) / curvature
    return i, x


def summarise(result):
    """Per size: mean loss per lr, the optimum; across sizes: drift in grid steps and in log2."""
    log2_lrs = [math.log2(v) for v in result["lrs"]]
    grid_step = (log2_lrs[-1] - log2_lrs[0]) / max(1, len(log2_lrs) - 1)
    rows = []
    for size, per_lr in zip(result["sizes"], result["losses"]):
        means = [sum(s) / len(s) if all(math.isfinite(v) for v in s) else math.inf for s in per_lr]
        i, x = optimum(log2_lrs, means)
        rows.append(dict(size=size, mean=means, best_index=i,
                         best_lr=None if i is None else result["lrs"][i],
                         best_loss=None if i is None else means[i], refined_log2_lr=x,
                         at_edge=i in (0, len(means) - 1)))
    found = [r for r in rows if r["best_index"] is not None]
    drift_steps = (max(r["best_index"] for r in found) - min(r["best_index"] for r in found)) if found else None
    refined = [r["refined_log2_lr"] for r in found]
    drift_log2 = (max(refined) - min(refined)) if refined else None
    return dict(rows=rows, drift_grid_steps=drift_steps, drift_log2=drift_log2, grid_step_log2=grid_step,
                optimum_at_grid_edge=any(r["at_edge"] for r in found))


# ------------------------------------------------------------------------------------------ outputs
def plot(path, model_kind, sweep, results):
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, (opt_name, res) in zip(axes[0], results.items()):
        summary = res["summary"]
        cmap = plt.get_cmap("viridis")
        finite_all = [v for r in summary["rows"] for v in r["mean"] if math.isfinite(v)]
        for k, row in enumerate(summary["rows"]):
            color = cmap(k / max(1, len(summary["rows"]) - 1))
            xs = [math.log2(v) for v, m in zip(res["lrs"], row["mean"]) if math.isfinite(m)]
            ys = [m for m in row["mean"] if math.isfinite(m)]
            ax.plot(xs, ys, "o-", color=color, ms=3, label=f"{sweep} {row['size']}")
            if row["best_index"] is not None:
                ax.plot([math.log2(row["best_lr"])], [row["best_loss"]], "*", color=color, ms=12, mec="k")
        if finite_all:
            lo = min(finite_all)
            ax.set_ylim(lo - 0.05, min(max(finite_all), lo + 1.5) + 0.05)
        name = "modula_mhc DualizeRetract" if opt_name == "dualize" else "AdamW (standard param.)"
        drift = summary["drift_grid_steps"]
        ax.set_title(f"{name}\noptimum drift: {drift} grid step(s)", fontsize=9)
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel("val loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model_kind.upper()} {sweep} sweep", fontsize=10)
    C.save_figure(fig, path)


def table(model_kind, sweep, results):
    lines = [f"### {model_kind.upper()}, {sweep} sweep\n"]
    header = ["optimizer", sweep, "best lr", "log2 best lr", "refined log2 lr", "best val loss"]
    rows = []
    for opt_name, res in results.items():
        s = res["summary"]
        for r in s["rows"]:
            if r["best_index"] is None:
                rows.append([opt_name, r["size"], "all diverged", "", "", ""])
                continue
            edge = " (grid edge)" if r["at_edge"] else ""
            rows.append([opt_name, r["size"], f"{r['best_lr']:.4g}{edge}", f"{math.log2(r['best_lr']):.2f}",
                         f"{r['refined_log2_lr']:.2f}", f"{r['best_loss']:.4f}"])
    lines.append(C.markdown_table(header, rows))
    lines.append("")
    for opt_name, res in results.items():
        s = res["summary"]
        lines.append(f"- {opt_name}: optimum drift {s['drift_grid_steps']} grid step(s) (factor-2 grid), "
                     f"refined drift {s['drift_log2']:.2f} in log2 units" if s["drift_log2"] is not None
                     else f"- {opt_name}: every run diverged")
    return "\n".join(lines) + "\n"


def merge_previous(path, config, results):
    """Keep the other optimizers' results from an earlier run with the same settings, so the
    baseline and modula_mhc can run as separate commands and still share one figure and table."""
    import json
    if not os.path.exists(path):
        return results
    with open(path) as f:
        old = json.load(f)
    same = {k: v for k, v in config.items() if k != "command"} == \
        {k: v for k, v in old.get("config", {}).items() if k != "command"}
    merged = {}
    for name, res in old.get("results", {}).items():
        if same and name not in results:
            res["losses"] = [[[math.inf if v is None else v for v in s] for s in per_lr] for per_lr in res["losses"]]
            res["summary"] = summarise(res)
            merged[name] = res
    merged.update(results)
    order = ["dualize", "adamw"]
    return {k: merged[k] for k in sorted(merged, key=order.index)}


# ------------------------------------------------------------------------------------------ main
def sweep_sizes(model_kind, sweep, args):
    d = DEFAULT_SIZES[(model_kind, sweep)]
    if sweep == "width":
        values = args.widths or d["values"]
        fixed = args.fixed_depth or d["fixed"]
        return [(w, fixed) for w in values], values
    values = args.depths or d["values"]
    fixed = args.fixed_width or d["fixed"]
    return [(fixed, dep) for dep in values], values


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = C.load_corpus(args.data, args.context)
    vocab = corpus.vocab_size
    lr_grid = {"dualize": args.lrs or [2.0 ** e for e in DEFAULT_LOG2_LRS["dualize"]],
               "adamw": args.adamw_lrs or [2.0 ** e for e in DEFAULT_LOG2_LRS["adamw"]]}
    for model_kind in args.model:
        steps = args.steps or DEFAULT_STEPS[model_kind]
        val = C.fixed_batches(batches(model_kind, corpus, "val", args, torch.Generator().manual_seed(0)),
                              args.val_batches)
        for sweep in args.sweep:
            shapes, values = sweep_sizes(model_kind, sweep, args)
            results = {}
            for opt_name in args.optimizer:
                lrs = sorted(lr_grid[opt_name])
                losses = []
                for (width, depth), size in zip(shapes, values):
                    per_lr = []
                    for lr in lrs:
                        per_seed = []
                        for seed in range(args.seeds):
                            gen = C.set_seed(seed)
                            model, make_opt = build(model_kind, opt_name, width, depth, vocab, args)
                            rec = C.run(model, make_opt(lr), steps, batches(model_kind, corpus, "train", args, gen),
                                        lr, val_batches=val, progress=args.progress,
                                        desc=f"{model_kind} {opt_name} w{width} d{depth} lr{lr:.3g}")
                            per_seed.append(rec["val_loss"])
                            print(f"{model_kind} {sweep} {opt_name} width={width} depth={depth} lr={lr:.4g} "
                                  f"seed={seed}: val {rec['val_loss']:.4f} ({rec['seconds']:.1f}s)", flush=True)
                        per_lr.append(per_seed)
                    losses.append(per_lr)
                res = dict(lrs=lrs, sizes=values, shapes=shapes, losses=losses, command=C.command_line())
                res["summary"] = summarise(res)
                results[opt_name] = res
            stem = os.path.join(args.out, f"lr_transfer_{model_kind}_{sweep}")
            config = dict(command=C.command_line(), model=model_kind, sweep=sweep, steps=steps, seeds=args.seeds,
                          batch=args.batch or (128 if model_kind == "mlp" else 16), context=args.context,
                          ngram=args.ngram, manifolds=args.manifolds, data=corpus.source, vocab_size=vocab,
                          schedule="linear decay to 0, no warmup", metric="final val loss, mean over seeds")
            results = merge_previous(stem + ".json", config, results)
            C.write_json(stem + ".json", dict(config=config, results=results))
            md = table(model_kind, sweep, results)
            commands = "\n".join(f"- {o}: `{r['command']}`" for o, r in results.items())
            C.write_text(stem + ".md", f"Commands:\n{commands}\n\n" + md)
            plot(stem + ".png", model_kind, sweep, results)
            print(md, flush=True)


if __name__ == "__main__":
    main()
