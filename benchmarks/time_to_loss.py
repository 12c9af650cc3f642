"""Time to loss: validation loss against training wall-clock for runs of ``modula-mhc train``.

Reads each run directory's metrics.jsonl (eval records carry ``train_seconds``: training time
without evaluation), and reports each run's final validation loss and when, in steps and seconds,
it first reached the reference run's final loss. Run the compared trainings side by side (same
machine, same time) so that their seconds compare:

    python -m modula_mhc train --preset small --data tinyshakespeare.txt --threads 1 --out runs/ttl/adamw --optimizer adamw &
    python -m modula_mhc train --preset small --data tinyshakespeare.txt --threads 1 --out runs/ttl/muon &
    wait
    python benchmarks/time_to_loss.py runs/ttl/adamw runs/ttl/muon --out docs/figures/time_to_loss_small

The first run is the reference. Writes <out>.json and <out>.png and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import pyplot  # noqa: E402


def evals(run_dir: str) -> list[dict]:
    """The eval records of a run, in step order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"time_to_loss: {path} not found (is {run_dir!r} a run directory?)")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    out = [r for r in records if r.get("kind") == "eval" and "train_seconds" in r]
    if not out:
        raise SystemExit(f"time_to_loss: {path} has no eval records with train_seconds")
    return sorted(out, key=lambda r: r["step"])


def first_reaching(curve: list[dict], target: float):
    """(step, train_seconds) of the first eval with val ≤ target, or None."""
    for r in curve:
        if r["val"] <= target:
            return r["step"], r["train_seconds"]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories; the first is the reference")
    ap.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    ap.add_argument("--out", default="runs/time_to_loss", help="output path without extension")
    args = ap.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("time_to_loss: give one --labels entry per run")
    curves = {lab: evals(r) for lab, r in zip(labels, args.runs)}
    target = curves[labels[0]][-1]["val"]
    rows = []
    for lab in labels:
        c = curves[lab]
        hit = first_reaching(c, target)
        rows.append({"run": lab, "steps": c[-1]["step"], "final_val": c[-1]["val"],
                     "train_seconds": c[-1]["train_seconds"],
                     "reaches_reference_at": None if hit is None else {"step": hit[0], "train_seconds": hit[1]}})
    print(f"reference: {labels[0]}, final val {target:.4f}")
    print(f"{'run':14s} {'steps':>6s} {'final val':>10s} {'train s':>8s}  reaches the reference's final val")
    for r in rows:
        hit = r["reaches_reference_at"]
        at = "never" if hit is None else f"step {hit['step']}, {hit['train_seconds']:.0f} s"
        print(f"{r['run']:14s} {r['steps']:6d} {r['final_val']:10.4f} {r['train_seconds']:8.0f}  {at}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"reference": labels[0], "runs": dict(zip(labels, args.runs)), "rows": rows,
                   "curves": curves}, f, indent=1)
    plt = pyplot(why_missing=True)
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab in labels:
        c = curves[lab]
        ax.plot([r["train_seconds"] for r in c], [r["val"] for r in c], marker=".", label=lab)
    ax.axhline(target, color="grey", lw=0.8, ls="--", label=f"{labels[0]} final ({target:.3f})")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=min(2.6, max(r["val"] for c in curves.values() for r in c)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    return rows


if __name__ == "__main__":
    main()
