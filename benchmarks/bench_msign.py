"""msign timing and quality: Polar Express (ours; Triton Gram products on GPU) vs Newton–Schulz.

Peer: torch.optim._muon._zeropower_via_newtonschulz (Keller Jordan's quintic, 5 steps) when
present, else the same quintic inline (labelled so). Quality = max |σ_i − 1| of the result.
Note: torch's Newton–Schulz casts to bf16 internally whatever the input dtype.
Run: python benchmarks/bench_msign.py [--size cpu|gpu] [--compile] [--repeats 7] [--threads N]
Writes benchmarks/results/msign_<size>.json and .png and prints a table.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modula_mhc.kernels import reference  # noqa: E402

from _report import save_bar_chart  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUINTIC = (3.4445, -4.7750, 2.0315)


def quintic_inline(G, steps=5):
    """Keller Jordan's quintic Newton–Schulz iteration (Muon), written out."""
    a, b, c = QUINTIC
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def load_peer():
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as ns
        return "peer: torch.optim Muon Newton-Schulz (5 steps)", lambda G: ns(G, QUINTIC, 5, 1e-7)
    except Exception:
        return "peer: quintic Newton-Schulz inline (5 steps)", quintic_inline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.size == "gpu" else "cpu"
    # CPU: fp32 (CPU bf16 matmul is not representative); GPU: bf16 as used in training.
    shape, dtype = ((4096, 4096), torch.bfloat16) if device == "cuda" else ((512, 1024), torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    G = torch.randn(*shape, device=device).to(dtype)
    methods = {"modula_mhc reference (Polar Express, 8 steps)": lambda X: reference.msign(X, 8)}
    if dtype != torch.bfloat16:  # the peer casts to bf16 internally: also time ours on bf16
        methods["modula_mhc reference, bf16 (8 steps)"] = lambda X: reference.msign(X.bfloat16(), 8)
    if device == "cuda":
        from modula_mhc.kernels import triton_msign
        methods["modula_mhc triton (Polar Express, 8 steps)"] = lambda X: triton_msign.msign(X, 8)
    if args.compile:
        methods["torch.compile(reference)"] = torch.compile(lambda X: reference.msign(X, 8))
    peer_name, peer = load_peer()
    methods[peer_name] = peer
    for fn in methods.values():
        fn(G)
        sync()
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(G)
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    quality = {}
    for name, fn in methods.items():
        s = torch.linalg.svdvals(fn(G).float().cpu().double())
        quality[name] = float((s - 1).abs().max())
    base = med[peer_name]
    print(f"msign of a {shape[0]}x{shape[1]} {dtype} Gaussian matrix, device={device}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'method':50s} {'ms':>9s} {'peer time / time':>17s} {'max|σ-1|':>10s}")
    for name in methods:
        print(f"{name:50s} {med[name] * 1e3:9.2f} {base / med[name]:17.2f} {quality[name]:10.2e}")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"msign_{args.size}")
    with open(path + ".json", "w") as fh:
        json.dump({"benchmark": "msign", "device": device, "shape": list(shape), "dtype": str(dtype),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "median_ms": {k: v * 1e3 for k, v in med.items()},
                   "max_abs_sv_minus_1": quality}, fh, indent=2)
    save_bar_chart(path + ".png", med, "time (ms, median)", f"msign {shape[0]}×{shape[1]} {dtype} ({device})")
    print("wrote", path + ".json")


if __name__ == "__main__":
    main()
