"""Cost of a certified Hetero step over a long run: dual iterations and CPU time per step, per window.

Trains a char-level GPT with DualizeRetract on the Hetero manifolds (Stiefel attention, DGram MLP)
for --steps steps at each --lrs learning rate and records, per window of --window steps, the
dual iterations per step (deterministic: free of the machine's timing noise) and the process CPU
time per step. Answers "does the optimizer's cost grow over a run?" beyond the 100 warm-up steps
of bench_train_step.py.

    python benchmarks/dual_cost_over_run.py --data tinyshakespeare.txt            # tiny preset, 600 steps
    python benchmarks/dual_cost_over_run.py --preset anchor --steps 300 --lrs 0.054

Writes benchmarks/results/dual_cost_over_run_<preset>.json and .png.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc.data import CharCorpus, default_corpus, load_text  # noqa: E402

from _report import add_malloc_option, apply_malloc, pyplot  # noqa: E402
from bench_train_step import PRESETS, make, train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def dual_iterations(opt) -> int:
    """Dual iterations of the last step, summed over every weight (stacked members included)."""
    total = 0
    for st in opt.state.values():
        v = st.get("iterations")
        if v is not None:
            total += int(v.sum()) if isinstance(v, torch.Tensor) else int(v)
    return total


def run(cfg, corpus, lr, steps, window, progress):
    gpt, opt = make("hetero", cfg, corpus.vocab_size, "cpu")
    for group in opt.param_groups:
        group["lr"] = lr
    g = torch.Generator().manual_seed(0)
    iters, cpu = [], []
    for _ in progress(range(steps), desc=f"hetero lr {lr}"):
        x, y = corpus.batch("train", cfg["batch"], cfg["context"], generator=g)
        t = time.process_time()
        train_step(gpt, opt, x, y)
        cpu.append(time.process_time() - t)
        iters.append(dual_iterations(opt))
    windows = [(i, i + window) for i in range(0, steps - window + 1, window)]
    return {"lr": lr, "window_start": [a for a, _ in windows],
            "dual_iterations_per_step": [sum(iters[a:b]) / window for a, b in windows],
            "cpu_ms_per_step": [1e3 * sum(cpu[a:b]) / window for a, b in windows]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--data", default=None, help="text file (default: the embedded corpus)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.054, 0.2],
                   help="0.054: the CLI's default for a 3200-step run; 0.2: bench_train_step's")
    add_malloc_option(p)
    args = p.parse_args()
    if args.steps < args.window or args.window < 1:
        p.error("--steps must be at least --window, and --window positive")
    torch.set_num_threads(1)
    malloc = apply_malloc(args)
    try:
        from tqdm import tqdm as progress
    except ImportError:
        def progress(it, **_):
            return it
    cfg = PRESETS[args.preset]
    corpus = CharCorpus.from_text(load_text(args.data) if args.data else default_corpus(), cfg["context"])
    runs = [run(cfg, corpus, lr, args.steps, args.window, progress) for lr in args.lrs]
    for r in runs:
        print(f"lr {r['lr']}: dual iterations per step per window of {args.window}: "
              + " ".join(f"{v:.1f}" for v in r["dual_iterations_per_step"]))
        print("        CPU ms per step: " + " ".join(f"{v:.0f}" for v in r["cpu_ms_per_step"]))
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"dual_cost_over_run_{args.preset}")
    with open(base + ".json", "w") as f:
        json.dump({"preset": args.preset, "config": cfg, "data": args.data or "embedded", "steps": args.steps,
                   "window": args.window, "threads": 1, "malloc": malloc, "runs": runs}, f, indent=1)
    plt = pyplot(why_missing=True)
    if plt is None:
        print(f"wrote {base}.json")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        mid = [s + args.window / 2 for s in r["window_start"]]
        axes[0].plot(mid, r["dual_iterations_per_step"], marker="o", label=f"lr {r['lr']}")
        axes[1].plot(mid, r["cpu_ms_per_step"], marker="o", label=f"lr {r['lr']}")
    axes[0].set(xlabel="step", ylabel="dual iterations per step", title=f"Hetero, {args.preset} preset")
    axes[1].set(xlabel="step", ylabel="CPU ms per step (1 thread)", title="training step")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=120)
    print(f"wrote {base}.json and .png")


if __name__ == "__main__":
    main()
