"""Sinkhorn fwd+bwd timing: our reference (and Triton on GPU) vs the peer method, side by side.

Peer: lucidrains hyper-connections' ``sinkhorn_knopps`` (F.normalize over exp(logits), plain
autograd) when the package imports, else the same loop written inline (labelled so).
Run: python benchmarks/bench_sinkhorn.py [--size cpu|gpu] [--compile] [--repeats 15] [--threads N]
Writes benchmarks/results/sinkhorn_<size>.json and .png and prints a table.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modula_mhc.kernels import reference  # noqa: E402

from _report import save_bar_chart  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def peer_inline(logits, iters=20):
    """The peer's method written out: alternate L1 column / row normalisation of exp(logits)."""
    x = (logits - logits.amax(dim=-2, keepdim=True).detach()).exp()
    for _ in range(iters):
        x = F.normalize(x, p=1, dim=-2)
        x = F.normalize(x, p=1, dim=-1)
    return x


def load_peer():
    try:
        from hyper_connections.manifold_constrained_hyper_connections import sinkhorn_knopps
        return "peer: hyper-connections sinkhorn_knopps", sinkhorn_knopps
    except Exception:
        return "peer method (inline F.normalize loop)", peer_inline


def time_fwd_bwd(methods, L, G, repeats, sync):
    """Median fwd+bwd seconds per method; methods are interleaved each round so load drift hits all."""
    def once(fn):
        x = L.detach().requires_grad_()
        (fn(x) * G).sum().backward()
        sync()
    for fn in methods.values():
        for _ in range(3):
            once(fn)
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            once(fn)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference) (slow to compile)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.size == "gpu" else "cpu"
    batch, n = (1 << 20, 4) if args.size == "gpu" else (4096, 4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    L = torch.randn(batch, n, n, device=device)
    G = torch.randn(batch, n, n, device=device)  # random grad_output
    it = args.iters
    methods = {"modula_mhc reference": lambda x: reference.sinkhorn(x, iters=it)}
    if device == "cuda":
        from modula_mhc.kernels import triton_sinkhorn
        methods["modula_mhc triton"] = lambda x: triton_sinkhorn.sinkhorn(x, iters=it)
    if args.compile:
        methods["torch.compile(peer loop)"] = torch.compile(lambda x: peer_inline(x, it))
    peer_name, peer = load_peer()
    methods[peer_name] = lambda x: peer(x, iters=it)
    rows = time_fwd_bwd(methods, L, G, args.repeats, sync)
    base = rows[peer_name]
    print(f"Sinkhorn fwd+bwd, {batch} matrices {n}x{n}, {it} iterations, device={device}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'method':45s} {'ms':>9s} {'speed-up vs peer':>17s}")
    for name, t in rows.items():
        print(f"{name:45s} {t * 1e3:9.2f} {base / t:17.2f}")
    os.makedirs(RESULTS, exist_ok=True)
    out = {"benchmark": "sinkhorn_fwd_bwd", "device": device, "batch": batch, "n": n, "iters": it,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "median_ms": {k: v * 1e3 for k, v in rows.items()},
           "speedup_vs_peer": {k: base / v for k, v in rows.items()}}
    path = os.path.join(RESULTS, f"sinkhorn_{args.size}")
    with open(path + ".json", "w") as fh:
        json.dump(out, fh, indent=2)
    save_bar_chart(path + ".png", rows, "fwd+bwd time (ms, median)", f"Sinkhorn {batch}×{n}×{n}, {it} iters ({device})")
    print("wrote", path + ".json")


if __name__ == "__main__":
    main()
