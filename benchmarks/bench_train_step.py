"""Training-step cost with real gradients: DualizeRetract (Hetero and Muon manifolds) vs AdamW.

One step = forward + backward + optimizer step of a char-level GPT on text (tinyshakespeare when
given with --data, else the package's embedded corpus). Each method first trains --warm-steps
steps (so warm starts and gradients are those of a real run), then the methods take turns, one
step each, for --repeats rounds: the ratios come from one process and one machine state. Step time
is also reported per window of the run, to show whether it grows.

    python benchmarks/bench_train_step.py                       # anchor GPT: width 128, 4 blocks
    python benchmarks/bench_train_step.py --preset tiny
    python benchmarks/bench_train_step.py --device cuda         # GPU: Hetero vs Muon target 1.5x

Writes benchmarks/results/train_step_<preset>_<methods>[_cuda].json and .png and prints a table.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc import compounds, optim  # noqa: E402
from modula_mhc.data import CharCorpus, default_corpus, load_text  # noqa: E402
from modula_mhc.optim.presets import PRESETS as MANIFOLD_PRESETS  # noqa: E402

from _report import add_malloc_option, apply_malloc, pyplot  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PRESETS = {"anchor": dict(width=128, depth=4, heads=4, context=64, batch=12),
           "tiny": dict(width=64, depth=2, heads=4, context=64, batch=12)}
#: method → (attention, MLP) manifolds, from the library's preset table (AdamW ignores them)
METHODS = {"adamw": MANIFOLD_PRESETS["muon"][:2], "muon": MANIFOLD_PRESETS["muon"][:2],
           "hetero": MANIFOLD_PRESETS["hetero"][:2]}
TARGETS = {"cpu": {"muon": 1.25, "hetero": 2.0}, "cuda": {"hetero/muon": 1.5}}
#: not a training method: the warmed Hetero run with every dual solve capped at one iteration
#: (uncertified), i.e. what a Hetero step costs outside the dual loop's iterations
FLOOR = "hetero-floor"


def floor_of(run):
    """A copy of a warmed Hetero (model, optimizer) whose Stiefel and DGram solves stop after one
    dual iteration: the step's cost without the iterations that certify it."""
    gpt = copy.deepcopy(run[0])
    for atom in gpt.atoms():
        if getattr(atom.manifold, "max_iters", None) is not None:
            capped = copy.copy(atom.manifold)
            capped.max_iters = 1
            atom.manifold = capped
    opt = optim.DualizeRetract(gpt, lr=run[1].param_groups[0]["lr"])
    opt.load_state_dict(run[1].state_dict())
    return gpt, opt


def make(method, cfg, vocab, device):
    torch.manual_seed(0)
    attn, mlp = METHODS[method]
    gpt = compounds.GPT(vocab_size=vocab, context=cfg["context"], width=cfg["width"], depth=cfg["depth"],
                        heads=cfg["heads"], attn_manifold=attn, mlp_manifold=mlp).to(device)
    if method == "adamw":
        return gpt, torch.optim.AdamW(gpt.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    return gpt, optim.DualizeRetract(gpt, lr=0.2)


def backward(gpt, x, y):
    """Forward and backward of the next-character loss; the loss, detached."""
    logits = gpt(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    return loss.detach()


def train_step(gpt, opt, x, y):
    loss = backward(gpt, x, y)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def dual_iterations(opt, total=False):
    """Dual iterations of the last step per manifold: the mean per matrix (or the sum with ``total``)."""
    if not isinstance(opt, optim.DualizeRetract):
        return {}
    out = {}
    for name, d in opt.diagnostics().items():
        if "iterations" in d and d["manifold"] in ("stiefel", "dgram"):
            out.setdefault(d["manifold"], []).append(d["iterations"])
    return {k: (sum(v) if total else statistics.mean(v)) for k, v in out.items()}


def warm_up(run, steps, batch, device, tqdm, name):
    """Train ``steps`` steps; (median ms per window, mean dual iterations per step per window) over 4
    windows. Dual iterations are deterministic, so growth shows through the machine's timing noise."""
    w, its = [], []
    for _ in tqdm(range(steps), desc=f"warm-up {name}", leave=False):
        x, y = batch()
        w.append(timed(lambda: train_step(*run, x, y), device))
        its.append(sum(dual_iterations(run[1], total=True).values()))
    k = max(1, steps // 4)
    return ([1e3 * statistics.median(w[i:i + k]) for i in range(0, len(w), k)],
            [statistics.mean(its[i:i + k]) for i in range(0, len(its), k)])


def print_table(rows, args, cfg, hetero_vs_muon):
    """The result table on stdout."""
    print(f"GPT {args.preset} {cfg}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"after {args.warm_steps} training steps, {args.repeats} interleaved rounds")
    print(f"{'method':8s} {'median ms':>10s} {'x AdamW':>8s}  per-window ms over warm-up   dual iterations")
    for r in rows:
        win = " ".join(f"{v:.0f}" for v in r["warmup_window_ms"])
        print(f"{r['method']:8s} {r['median_ms']:10.1f} {r['ratio_vs_adamw']:8.2f}  {win:26s}  {r['dual_iterations']}")
        if any(r["warmup_window_dual_iterations_per_step"]):
            print(f"{'':8s} dual iterations per step over the warm-up windows: "
                  + " ".join(f"{v:.1f}" for v in r["warmup_window_dual_iterations_per_step"]))
    if hetero_vs_muon is not None:
        print(f"hetero / muon: {hetero_vs_muon:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="anchor")
    ap.add_argument("--data", default=None, help="text file (default: the embedded corpus)")
    ap.add_argument("--warm-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    add_malloc_option(ap)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + [FLOOR],
                    help=f"{FLOOR}: the warmed Hetero run with one dual iteration per solve (uncertified)")
    args = ap.parse_args(argv)
    malloc = apply_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    text = load_text(args.data) if args.data else default_corpus()
    corpus = CharCorpus.from_text(text, cfg["context"])
    g = torch.Generator().manual_seed(1)

    def batch():
        x, y = corpus.batch("train", cfg["batch"], cfg["context"], generator=g)
        return x.to(args.device), y.to(args.device)

    if FLOOR in args.methods and "hetero" not in args.methods:
        ap.error(f"{FLOOR} is measured on the warmed Hetero run: list hetero too")
    trained = [m for m in args.methods if m != FLOOR]
    runs = {m: make(m, cfg, corpus.vocab_size, args.device) for m in trained}
    windows = {m: [] for m in args.methods}
    iteration_windows = {m: [] for m in args.methods}
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        def tqdm(it, **_):
            return it
    for m in trained:  # a real run first: warm starts and gradients as training sees them
        windows[m], iteration_windows[m] = warm_up(runs[m], args.warm_steps, batch, args.device, tqdm, m)
    if FLOOR in args.methods:
        runs[FLOOR] = floor_of(runs["hetero"])
    times = {m: [] for m in args.methods}
    losses = {m: None for m in args.methods}
    for _ in tqdm(range(args.repeats), desc="interleaved"):
        x, y = batch()
        for m in args.methods:
            times[m].append(timed(lambda: losses.__setitem__(m, float(train_step(*runs[m], x, y))), args.device))
    med = {m: statistics.median(v) for m, v in times.items()}
    base = med.get("adamw", next(iter(med.values())))
    rows = [{"method": m, "median_ms": 1e3 * med[m], "ratio_vs_adamw": med[m] / base,
             "warmup_window_ms": windows[m], "dual_iterations": dual_iterations(runs[m][1]),
             "warmup_window_dual_iterations_per_step": iteration_windows[m],
             "loss_after": losses[m]} for m in args.methods]
    if "muon" in med and "hetero" in med:
        hetero_vs_muon = med["hetero"] / med["muon"]
    else:
        hetero_vs_muon = None
    print_table(rows, args, cfg, hetero_vs_muon)
    os.makedirs(RESULTS, exist_ok=True)
    # train_step_<preset>_<methods other than the AdamW baseline>[_<device>]: the committed names
    stem = "_".join(["train_step", args.preset] + [m for m in args.methods if m != "adamw"]
                    + ([] if args.device == "cpu" else [args.device]))
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"config": vars(args), "malloc": malloc, "model": cfg, "rows": rows, "hetero_vs_muon": hetero_vs_muon,
                   "targets": TARGETS.get(args.device, {})}, f, indent=2)
    plt = pyplot(why_missing=True)
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["method"] for r in rows], [r["ratio_vs_adamw"] for r in rows], color="tab:blue")
    for name, t in TARGETS.get(args.device, {}).items():
        if name in med:
            ax.plot([list(med).index(name) - 0.4, list(med).index(name) + 0.4], [t, t], "r--")
    ax.set_ylabel("step time / AdamW step")
    ax.set_title(f"GPT train step ({args.preset}, real gradients after {args.warm_steps} steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, stem + ".png"), dpi=100)
    return rows


if __name__ == "__main__":
    main()
