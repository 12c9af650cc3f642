"""Triton kernels against their PyTorch references at the GPU benchmark sizes (CUDA only).

The unit tests (tests/test_kernels_triton.py) check small and ragged shapes; this checks the sizes
the benchmarks time, on fresh random inputs, as ‖triton − ref‖ / ‖ref‖ with the reference in
float64 (msign in float32: a 4096² float64 Polar Express is slow and float32 is already far more
accurate than the bf16 kernel). Output and gradients (random grad_output) are compared; a NaN
fails. Prints one line per kernel and exits 1 if any ratio is over its bound.

    python benchmarks/gpu_full_size.py
    TRITON_INTERPRET=1 python benchmarks/gpu_full_size.py --small   # the script itself, on CPU
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc.kernels import mhc_reference, reference, sinkhorn_reference, triton_mhc, triton_msign, triton_sinkhorn  # noqa: E402

# bf16 operands land between 1e-3 and 1e-2; float32 kernels far under 1e-3
BOUNDS = {"bf16": 2e-2, "fp32": 1e-4}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare(name, f_kernel, f_ref, inputs, ref_dtype, bound):
    """Forward and backward of f_kernel on inputs against f_ref on inputs cast to ref_dtype."""
    a = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    b = [x.detach().to(ref_dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    oa, ob = f_kernel(*a), f_ref(*b)
    oa = oa if isinstance(oa, tuple) else (oa,)
    ob = ob if isinstance(ob, tuple) else (ob,)
    gs = [torch.randn_like(o, dtype=torch.float32) for o in ob]
    sum((o.float() * g).sum() for o, g in zip(oa, gs)).backward()
    sum((o * g.to(ref_dtype)).sum() for o, g in zip(ob, gs)).backward()
    errs = [rel(x, y) for x, y in zip(oa, ob)] + [rel(x.grad, y.grad) for x, y in zip(a, b) if x.grad is not None]
    worst = max(errs)
    ok = worst == worst and worst < bound
    print(f"{name:40s} worst rel err {worst:.2e}  (bound {bound:.0e})  {'ok' if ok else 'FAIL'}  all: "
          + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU (under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("gpu_full_size.py needs CUDA (or --small under TRITON_INTERPRET=1)")
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs on every run
    dev = "cpu" if args.small else "cuda"
    side, batch, (T, n, C) = (64, 37, (50, 4, 40)) if args.small else (4096, 1 << 20, (8192, 4, 2048))
    results = []
    # msign: the benchmark's 4096×4096 bf16 (forward only: Polar Express has no backward here)
    G = torch.randn(side, side, device=dev).bfloat16()
    want = reference.msign(G.float(), 8)
    e, e_torch = rel(triton_msign.msign(G, 8), want), rel(reference.msign(G, 8), want)
    bound = max(BOUNDS["bf16"], 1.5 * e_torch)  # bf16 rounding through 8 steps: no worse than torch's own bf16 run
    ok = e == e and e < bound
    print(f"{f'msign {side}x{side} bf16':40s} rel err {e:.2e}  (bound {bound:.0e}; torch bf16 {e_torch:.1e})  "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    results.append(ok)
    # Sinkhorn: the benchmark's 2^20 matrices of 4×4, 20 iterations, fp32
    L = torch.randn(batch, 4, 4, device=dev) * 2
    results.append(compare(f"sinkhorn {batch} x 4x4 fp32", lambda x: triton_sinkhorn.sinkhorn(x, iters=20),
                           lambda x: sinkhorn_reference.sinkhorn(x, iters=20), [L], torch.float64, BOUNDS["fp32"]))
    # mHC: 8192 tokens, n = 4 streams, width 2048, bf16 activations (the block benchmark's largest)
    x = torch.randn(T, n, C, device=dev).bfloat16()
    f = torch.randn(T, C, device=dev).bfloat16()
    h_pre, h_post = torch.rand(T, n, device=dev), torch.rand(T, n, device=dev) * 2
    h_res = sinkhorn_reference.sinkhorn(torch.randn(T, n, n, device=dev), iters=20)
    phi = torch.randn(n * C, n * n + 2 * n, device=dev) / (n * C) ** 0.5
    results.append(compare(f"mhc_pre {T}x{n}x{C} bf16", triton_mhc.mhc_pre, mhc_reference.mhc_pre, [x, h_pre],
                           torch.float64, BOUNDS["bf16"]))
    results.append(compare(f"mhc_post_res {T}x{n}x{C} bf16", triton_mhc.mhc_post_res, mhc_reference.mhc_post_res,
                           [x, f, h_res, h_post], torch.float64, BOUNDS["bf16"]))
    results.append(compare(f"mhc_coeff_input {T}x{n * C} bf16", triton_mhc.mhc_coeff_input, mhc_reference.mhc_coeff_input,
                           [x.flatten(-2), phi], torch.float64, BOUNDS["bf16"]))
    print(f"full-size kernel checks: {sum(results)}/{len(results)} ok", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
