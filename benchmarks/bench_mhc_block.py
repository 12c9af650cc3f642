"""Forward + backward time of a plain residual vs mHC (n = 4), measured side by side in one run.

Two comparisons per width:
  * layer: one residual layer around a Linear + GELU branch, x + F(x) vs one HyperConnections layer
    (the CPU target: mHC ≤ 3× the plain residual; lucidrains hyper-connections measured 13.5×);
  * block: a GPT Block (attention + MLP, plain residual) vs hyper_block (mHC around both branches)
    (target ≤ 1.3× on CPU, ≤ 1.10× on a GPU).
Timings are medians of interleaved repetitions, in wall-clock time and in CPU time of this process
(the CPU-time ratio is the steadier one on a machine shared with other work); ratios are what to
read. Results go to benchmarks/results/bench_mhc_block_<size>.json and .png.

    python benchmarks/bench_mhc_block.py              # CPU: width 256, 4096 tokens
    python benchmarks/bench_mhc_block.py --size gpu   # CUDA: widths 768..2048, 8192 tokens
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from modula_mhc import atoms, bonds, compounds
from modula_mhc.compounds import HyperConnections, hyper_block

from _report import add_malloc_option, apply_malloc  # (the script's own folder is on sys.path)

SIZES = {
    "cpu": dict(widths=[256], batch=16, seq=256, heads=4, reps=11, device="cpu"),
    "gpu": dict(widths=[768, 1024, 1536, 2048], batch=8, seq=1024, heads=8, reps=20, device="cuda"),
}


class PlainLayer(torch.nn.Module):
    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, x, g, device):
    """(wall, CPU) seconds of one forward + backward."""
    x = x.detach().requires_grad_()
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn(x).backward(g)
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def compare(make_a, make_b, shape_a, shape_b, reps, device, dtype):
    torch.manual_seed(0)
    a, b = make_a().to(device, dtype), make_b().to(device, dtype)
    xa, xb = torch.randn(shape_a, device=device, dtype=dtype), torch.randn(shape_b, device=device, dtype=dtype)
    ga, gb = torch.randn_like(xa), torch.randn_like(xb)
    for _ in range(2):  # warm-up
        _time(a, xa, ga, device), _time(b, xb, gb, device)
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_time(a, xa, ga, device))
        tb.append(_time(b, xb, gb, device))
    (ma, ca), (mb, cb) = ([statistics.median(v) for v in zip(*t)] for t in (ta, tb))
    return dict(plain_ms=1e3 * ma, mhc_ms=1e3 * mb, ratio=mb / ma,
                plain_cpu_ms=1e3 * ca, mhc_cpu_ms=1e3 * cb, ratio_cpu=cb / ca)


def profile_one(make, shape, device, dtype):
    """torch.profiler's table of one forward + backward (after a warm-up), sorted by device time."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    mod = make().to(device, dtype)
    x = torch.randn(shape, device=device, dtype=dtype)
    g = torch.randn_like(x)
    _time(mod, x, g, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        _time(mod, x, g, device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="widths (default: the size's list)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one forward+backward of the mHC layer and block at the last width")
    add_malloc_option(ap)
    args = ap.parse_args()
    malloc = apply_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SIZES[args.size]
    device = cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--size gpu needs CUDA")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    n, B, T = args.streams, cfg["batch"], cfg["seq"]
    rows = []
    for C in args.widths or cfg["widths"]:
        def branch():
            return bonds.GELU() @ atoms.Linear(C, C)
        layer = compare(lambda: PlainLayer(branch()), lambda: HyperConnections(branch(), streams=n, width=C),
                        (B, T, C), (B, T, n, C), cfg["reps"], device, dtype)
        block = compare(lambda: compounds.Block(C, cfg["heads"], depth=4, attn_manifold="euclidean",
                                                mlp_manifold="euclidean"),
                        lambda: hyper_block(C, cfg["heads"], 4, streams=n, constrained=True),
                        (B, T, C), (B, T, n, C), cfg["reps"], device, dtype)
        for kind, r in (("layer (Linear+GELU branch)", layer), ("GPT block", block)):
            rows.append(dict(width=C, tokens=B * T, streams=n, kind=kind, **r))
            print(f"width {C:5d}  tokens {B * T}  {kind:28s} plain {r['plain_ms']:8.2f} ms   "
                  f"mHC {r['mhc_ms']:8.2f} ms   ratio {r['ratio']:.2f}x   (CPU time: {r['ratio_cpu']:.2f}x)")
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    if args.profile:
        C = (args.widths or cfg["widths"])[-1]
        tables = [profile_one(make, (B, T, n, C), device, dtype) for make in
                  (lambda: HyperConnections(bonds.GELU() @ atoms.Linear(C, C), streams=n, width=C),
                   lambda: hyper_block(C, cfg["heads"], 4, streams=n, constrained=True))]
        text = f"mHC layer (Linear+GELU branch), width {C}, tokens {B * T}\n{tables[0]}\n\nmHC GPT block\n{tables[1]}\n"
        (out / f"bench_mhc_block_{args.size}_profile.txt").write_text(text)
        print(text)
    meta = dict(device=device if device == "cpu" else torch.cuda.get_device_name(), dtype=str(dtype),
                torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(), malloc=malloc)
    (out / f"bench_mhc_block_{args.size}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['kind']}\nC={r['width']}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("mHC / plain (fwd+bwd time)")
    ax.set_title(f"mHC (n={n}) vs plain residual, {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"bench_mhc_block_{args.size}.png", dpi=90)
    print(f"wrote {out}/bench_mhc_block_{args.size}.json and .png")


if __name__ == "__main__":
    main()
