"""How the best learning rate moves with run length, and the rule the CLI uses for it.

The modular norm makes DualizeRetract's learning rate transfer across width and depth, not across
the number of steps. This trains one model (a preset of ``python -m modula_mhc train``, linear
decay) at several run lengths, each over a factor-2 lr grid centred on the CLI's default
``lr_for_steps(T) = 0.25·min(1, √(150/T))``, and reports the measured optimum per length.

    python examples/lr_vs_steps.py                                # tiny preset: 150, 600, 2400 steps
    python examples/lr_vs_steps.py --steps 150 600 --factors 0.5 1 2
    python examples/lr_vs_steps.py --runs runs/lr_vs_steps        # reuse finished runs (same names)

Each run is a CLI run directory ``s<steps>_lr<lr>`` under --runs (a finished one is read, not
retrained). Outputs in --out (default runs/examples): lr_vs_steps.png (val loss against lr, one
curve per length, the rule's lr marked), .json (every run) and .md (the optimum table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modula_mhc.config import PRESETS, ConfigError, resolve_config  # noqa: E402
from modula_mhc.optim import lr_for_steps  # noqa: E402
from modula_mhc.train import TrainConfig, train  # noqa: E402

import _common as C  # noqa: E402


def final_val(run_dir):
    """The last evaluation's val loss of a finished CLI run, or None."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    if metrics.get("status") != "completed":
        return None
    return metrics["history"]["eval"][-1]["val"]


def run_config(args, steps, factor, out=None):
    """The CLI run of ``steps`` steps at ``factor`` × lr_for_steps(steps)."""
    lr = float(f"{lr_for_steps(steps) * factor:.6g}")
    return TrainConfig(preset=args.preset, data=args.data, steps=steps, lr=lr, seed=args.seed, threads=1,
                       sample_chars=0, quiet=True, out=out, force=out is not None and os.path.exists(out))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--data", default=None, help="text file (default: the embedded corpus)")
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 600, 2400])
    ap.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="lr grid as multiples of lr_for_steps(steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=os.path.join(C.OUT, "lr_vs_steps"), help="run directories")
    ap.add_argument("--out", default=C.OUT, help="output folder (default runs/examples, git-ignored)")
    args = ap.parse_args(argv)
    for steps in args.steps:
        if steps < 1:
            ap.error(f"--steps must be >= 1, got {steps}")
    for factor in args.factors:
        if not (math.isfinite(factor) and factor > 0):
            ap.error(f"--factors must be positive, got {factor:g}")
    C.check_data(ap, args.data, PRESETS[args.preset]["context"])
    for steps in args.steps:  # every run's config as `modula-mhc train` checks it, before the first run
        for factor in args.factors:
            try:
                resolve_config(run_config(args, steps, factor))
            except ConfigError as e:  # the lr is --factors × lr_for_steps(steps)
                option = "factors" if e.option == "lr" else e.option.replace("_", "-")
                ap.error(f"--{option}: {e.reason}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for steps in args.steps:
        for factor in args.factors:
            lr = run_config(args, steps, factor).lr
            run_dir = os.path.join(args.runs, f"s{steps}_lr{lr:g}")
            val = final_val(run_dir)
            if val is None:
                metrics = train(run_config(args, steps, factor, out=run_dir))
                val = metrics["history"]["eval"][-1]["val"]
            rows.append(dict(steps=steps, lr=lr, rule_lr=lr_for_steps(steps), factor=factor, val=val))
            print(f"steps {steps:6d}  lr {lr:<9.4g} ({factor:g}× rule)  val {val:.4f}")
    table = ["| steps | rule lr | best lr of the grid | best val | grid (lr: val) |", "|---|---|---|---|---|"]
    for steps in args.steps:
        mine = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["lr"])
        best = min(mine, key=lambda r: r["val"])
        grid = ", ".join(f"{r['lr']:.4g}: {r['val']:.3f}" for r in mine)
        table.append(f"| {steps} | {lr_for_steps(steps):.4g} | {best['lr']:.4g} | {best['val']:.3f} | {grid} |")
    print("\n".join(table))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "lr_vs_steps")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(dict(preset=args.preset, data=args.data, seed=args.seed, rows=rows), f, indent=1)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(table) + "\n")
    plt = C.pyplot()
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for steps in args.steps:
        mine = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["lr"])
        line, = ax.plot([r["lr"] for r in mine], [r["val"] for r in mine], "o-", label=f"{steps} steps")
        ax.axvline(lr_for_steps(steps), color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak lr (dotted: lr_for_steps)")
    ax.set_ylabel("final val loss (nats/char)")
    ax.set_title(f"best lr vs run length ({args.preset} preset, linear decay)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    print(f"wrote {stem}.png, .json and .md")
    return rows


if __name__ == "__main__":
    main()
