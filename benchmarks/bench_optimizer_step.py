"""Wall time of one optimizer step on GPT-shaped weight matrices: Muon vs DualizeRetract on
Euclidean / Stiefel / DGram / hetero vs AdamW, measured side by side in one run, plus the
dual-descent iterations per matrix shape.

Shapes per layer (torch (out, in)): 4 × (d, d) attention, (4d, d) MLP in, (d, 4d) MLP out.
GPT-2 small is --width 768 --layers 12 (GPU-sized); the CPU default is --width 128 --layers 1.

    python benchmarks/bench_optimizer_step.py                 # CPU default, ~1-2 minutes
    python benchmarks/bench_optimizer_step.py --width 768 --layers 12 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modula_mhc import atoms, optim  # noqa: E402
from modula_mhc.module import Module  # noqa: E402


def shapes(width, layers):
    d = width
    per_layer = [("attn", (d, d))] * 4 + [("mlp_in", (4 * d, d)), ("mlp_out", (d, 4 * d))]
    return per_layer * layers


class Bag(Module):
    """A flat container of Linear atoms (coefficient 1 each: every atom gets target 1)."""

    def __init__(self, linears):
        super().__init__()
        self.linears = torch.nn.ModuleList(linears)

    def _coefficient_map(self):
        return {a: 1.0 for a in self.linears}


def build(kind, spec, device):
    torch.manual_seed(0)
    role_manifold = {
        "euclidean": {"attn": "euclidean", "mlp_in": "euclidean", "mlp_out": "euclidean"},
        "stiefel": {"attn": "stiefel", "mlp_in": "stiefel", "mlp_out": "stiefel"},
        "dgram": {"attn": "dgram", "mlp_in": "dgram", "mlp_out": "dgram"},
        "hetero": {"attn": "stiefel", "mlp_in": "dgram", "mlp_out": "dgram"},
    }.get(kind, {"attn": "euclidean", "mlp_in": "euclidean", "mlp_out": "euclidean"})
    lins = [atoms.Linear(s[1], s[0], manifold=role_manifold[role], role=role) for role, s in spec]
    bag = Bag(lins).to(device)
    params = [lin.weight for lin in lins]
    if kind == "adamw":
        return bag, params, torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if kind == "torch-muon":
        return bag, params, torch.optim.Muon(params, lr=0.02, momentum=0.95, weight_decay=0.0)
    return bag, params, optim.DualizeRetract(bag, lr=0.02, momentum=0.95)


def run_all(kinds, spec, device, warmup, repeats):
    """Round-robin timing: every repeat times one step of each optimizer in turn, so background
    load on a shared machine hits all of them alike. Returns {kind: (median s, min s, iterations)}."""
    setups = {k: build(k, spec, device) for k in kinds}
    g = torch.Generator(device="cpu").manual_seed(1)
    base = [torch.randn(s, generator=g) for _, s in spec]
    times = {k: [] for k in kinds}
    for it in range(warmup + repeats):
        noise = [0.1 * torch.randn(b.shape, generator=g) for b in base]
        for kind in kinds:
            _, params, opt = setups[kind]
            for p, b, e in zip(params, base, noise):  # slowly varying gradients, as momentum sees them
                p.grad = (b + e).to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if it >= warmup:
                times[kind].append(time.perf_counter() - t0)
    out = {}
    for kind in kinds:
        opt = setups[kind][2]
        iters = {}
        if isinstance(opt, optim.DualizeRetract):
            for (role, s), d in zip(spec, opt.diagnostics().values()):
                if "iterations" in d:
                    iters.setdefault(f"{role} {s[0]}x{s[1]}", []).append(d["iterations"])
        out[kind] = (statistics.median(times[kind]), min(times[kind]),
                     {k: statistics.mean(v) for k, v in iters.items()})
    return out


def dual_table():
    """Dual-descent iterations and quality on Gaussian and low-rank gradients (fp32, CPU):
    reference schedule (K=100, α=0.01·(1 − k/K), un-normalised G) residual vs ours; ⟨G, A⟩ as a
    fraction of a float64 long-run value (plain dual, 3000 iterations, tol 1e-9)."""
    import math
    from modula_mhc.kernels import msign
    from modula_mhc.manifolds import DGram, Stiefel
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, (m, n) in [("stiefel", (128, 64)), ("stiefel", (256, 128)), ("stiefel", (512, 128)),
                         ("stiefel", (64, 64)), ("dgram", (128, 64)), ("dgram", (48, 32)), ("dgram", (32, 32))]:
        W = Stiefel().random((m, n), generator=g)
        if name == "dgram":
            W = DGram().retract(W * (0.5 + 1.5 * torch.rand(n, generator=g)))
        for kind in ("gauss", "lowrank"):
            G = torch.randn(m, n, generator=g) if kind == "gauss" else \
                torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) + 0.05 * torch.randn(m, n, generator=g)
            ref = "-"
            if name == "stiefel":
                lam = -0.25 * (W.mT @ G + G.mT @ W)
                for k in range(100):
                    A = msign(G + 2 * W @ lam)
                    lam = lam - 0.01 * (1 - k / 100) * (W.mT @ A + A.mT @ W)
                A = msign(G + 2 * W @ lam)
                ref = f"{((W.mT @ A + A.mT @ W).norm() / n).item():.1e}"
            cls = Stiefel if name == "stiefel" else DGram
            best = cls(tol=1e-9, max_iters=3000, **({} if name == "stiefel" else {"smoothing": 0.0}))
            opt = (G.double() * best.dualize(W.double(), G.double())).sum().item()
            cells = []
            variants = [("default", cls())] + ([("plain", DGram(smoothing=0.0))] if name == "dgram" else [])
            for label, man in variants:
                st = {}
                A = man.dualize(W, G, st)
                cells.append((label, st["iterations"], (G * A).sum().item() / opt, st["dual_residual"]))
            rows.append((name, f"{m}x{n}", kind, ref, cells))
    print("| manifold | shape | G | reference K=100 residual | ours: iterations, ⟨G,A⟩/long-run, final dual residual |")
    print("|---|---|---|---|---|")
    for name, shape, kind, ref, cells in rows:
        txt = "; ".join(f"{lab}: {it} it, {q:.4f}, {r:.0e}" for lab, it, q, r in cells)
        print(f"| {name} | {shape} | {kind} | {ref} | {txt} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kinds", nargs="+",
                    default=["adamw", "torch-muon", "euclidean", "stiefel", "dgram", "hetero"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--dual-table", action="store_true", help="print the dual-descent quality table and exit")
    args = ap.parse_args(argv)
    if args.dual_table:
        return dual_table()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = shapes(args.width, args.layers)
    n_params = sum(a * b for _, (a, b) in spec)
    print(f"{len(spec)} matrices, {n_params / 1e6:.2f}M parameters, device {args.device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats} after {args.warmup} warmup")
    rows = {}
    for kind, (t, tmin, iters) in run_all(args.kinds, spec, args.device, args.warmup, args.repeats).items():
        rows[kind] = {"seconds": t, "min_seconds": tmin, "iterations": iters}
    ref_adamw = rows.get("adamw", {}).get("seconds")
    ref_muon = rows.get("torch-muon", {}).get("seconds")
    print(f"\n| optimizer | ms/step (median) | ms/step (min) | × AdamW | × torch Muon | dual iterations (last step) |")
    print("|---|---|---|---|---|---|")
    for kind, r in rows.items():
        r["x_adamw"] = r["seconds"] / ref_adamw if ref_adamw else None
        r["x_muon"] = r["seconds"] / ref_muon if ref_muon else None
        its = ", ".join(f"{k}: {v:.0f}" for k, v in r["iterations"].items()) or "-"
        fa = f"{r['x_adamw']:.1f}" if r["x_adamw"] else "-"
        fm = f"{r['x_muon']:.1f}" if r["x_muon"] else "-"
        print(f"| {kind} | {r['seconds'] * 1e3:.1f} | {r['min_seconds'] * 1e3:.1f} | {fa} | {fm} | {its} |")
    os.makedirs(args.out, exist_ok=True)
    meta = {"width": args.width, "layers": args.layers, "device": args.device, "params": n_params,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "command": "python benchmarks/bench_optimizer_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    path = os.path.join(args.out, "optimizer_step.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\nwrote {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.5))
        kinds = list(rows)
        ax.bar(kinds, [rows[k]["seconds"] * 1e3 for k in kinds], color="tab:blue")
        ax.set_ylabel("ms per optimizer step")
        ax.set_yscale("log")
        ax.set_title(f"one step, width {args.width}, {args.layers} layer(s), {args.device}")
        fig.tight_layout()
        png = os.path.join(args.out, "optimizer_step.png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    except ImportError:
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
