"""mHC stream-mixing fwd+bwd timing: coefficients (x φ + Σx²), pre-mix, post + residual.

Compares the PyTorch reference (and the Triton kernels on GPU) with the plain residual add
x + f(x) that mHC replaces, measured side by side (interleaved rounds, median).
Run: python benchmarks/bench_mhc_mixing.py [--size cpu|gpu] [--compile] [--repeats 15] [--threads N]
Writes benchmarks/results/mhc_mixing_<size>.json and .png and prints a table.
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

from _report import add_malloc_option, apply_malloc, save_bar_chart  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mixing_step(ops, x, f, phi, h_res, h_post, h_pre):
    """One layer's mixing: coefficients from the flat stream, pre-mix, then post + residual."""
    coeff, ss = ops.mhc_coeff_input(x.flatten(-2), phi)
    y = ops.mhc_pre(x, h_pre)
    out = ops.mhc_post_res(x, y * f, h_res, h_post)  # f stands in for the branch (elementwise)
    return out.sum() + coeff.sum() + ss.sum()


def plain_residual(x1, f1):
    return (x1 + x1 * f1).sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    add_malloc_option(ap)
    args = ap.parse_args()
    malloc = apply_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.size == "gpu" else "cpu"
    T, n, C = (65536, 4, 1024) if device == "cuda" else (4096, 4, 256)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = 2 * n + n * n
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(T, n, C, device=device, dtype=dtype)
    f = torch.randn(T, C, device=device, dtype=dtype)
    phi = torch.randn(n * C, m, device=device) * 0.01
    h_res = reference.sinkhorn(torch.randn(T, n, n, device=device))
    h_post = torch.rand(T, n, device=device) * 2
    h_pre = torch.rand(T, n, device=device)
    x1 = torch.randn(T, C, device=device, dtype=dtype)

    def run(ops):
        def go():
            xs = x.detach().requires_grad_()
            ps = phi.detach().requires_grad_()
            hr = h_res.detach().requires_grad_()
            mixing_step(ops, xs, f, ps, hr, h_post, h_pre).backward()
        return go

    def run_plain():
        xs = x1.detach().requires_grad_()
        plain_residual(xs, f).backward()

    methods = {"plain residual x + f (n = 1 baseline)": run_plain, "modula_mhc reference mixing": run(reference)}
    if device == "cuda":
        from modula_mhc.kernels import triton_mhc
        methods["modula_mhc triton mixing"] = run(triton_mhc)
    if args.compile:
        compiled = torch.compile(lambda *a: mixing_step(reference, *a))

        def run_compiled():
            xs = x.detach().requires_grad_()
            compiled(xs, f, phi.detach().requires_grad_(), h_res.detach().requires_grad_(), h_post, h_pre).backward()
        methods["torch.compile(reference mixing)"] = run_compiled
    for fn in methods.values():
        for _ in range(3):
            fn()
            sync()
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain residual x + f (n = 1 baseline)"]
    print(f"mHC mixing fwd+bwd, {T} tokens, n={n}, C={C}, {dtype}, device={device}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'method':45s} {'ms':>9s} {'x plain residual':>17s}")
    for name, t in med.items():
        print(f"{name:45s} {t * 1e3:9.2f} {t / base:17.2f}")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"mhc_mixing_{args.size}")
    with open(path + ".json", "w") as fh:
        json.dump({"benchmark": "mhc_mixing_fwd_bwd", "device": device, "tokens": T, "n": n, "C": C,
                   "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc": malloc,
                   "median_ms": {k: v * 1e3 for k, v in med.items()},
                   "ratio_to_plain_residual": {k: v / base for k, v in med.items()}}, fh, indent=2)
    save_bar_chart(path + ".png", med, "fwd+bwd time (ms, median)", f"mHC mixing, {T} tokens, n={n}, C={C} ({device})")
    print("wrote", path + ".json")


if __name__ == "__main__":
    main()
