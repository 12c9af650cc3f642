"""The symmetric eigendecomposition on a GPU, by backend, size, dtype and batch (CUDA only).

The certified Stiefel/DGram dual solve takes one eigendecomposition of an n×n float64 matrix per
iteration, and on an H100 that call (cuSOLVER, ~1 ms of device and 1.4–1.7 ms of host time for
n = 128) is 88% of a Hetero step. This times the alternatives a redesign could use, each as the
median wall time of a synchronised call (host overhead included, as the solver pays it):
cuSOLVER and MAGMA (``torch.backends.cuda.preferred_linalg_library``), float64 and float32,
one matrix or a batch of 8, eigh and eigvalsh, and the host CPU's LAPACK with the two copies.
Writes benchmarks/results/eigh_options_gpu.json.

    python benchmarks/gpu_eigh_options.py
"""
import json
import os
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def wall_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def spd(batch, n, dtype, device):
    A = torch.randn(batch, n, n, dtype=torch.float64, device=device)
    return (A @ A.mT / n + 1e-3 * torch.eye(n, dtype=torch.float64, device=device)).to(dtype)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("gpu_eigh_options.py needs CUDA")
    rows = []
    for n in (64, 128, 512):
        for dtype in (torch.float64, torch.float32):
            for batch in (1, 8):
                A = spd(batch, n, dtype, "cuda")
                for lib in ("cusolver", "magma"):
                    try:
                        torch.backends.cuda.preferred_linalg_library(lib)
                        eigh = wall_ms(lambda: torch.linalg.eigh(A))
                        eigvalsh = wall_ms(lambda: torch.linalg.eigvalsh(A))
                    except Exception as err:  # a backend missing from this build
                        eigh = eigvalsh = float("nan")
                        print(f"{lib}: {type(err).__name__}: {str(err)[:80]}")
                    rows.append(dict(n=n, dtype=str(dtype), batch=batch, backend=lib, eigh_ms=eigh, eigvalsh_ms=eigvalsh))
                torch.backends.cuda.preferred_linalg_library("default")
                cpu = wall_ms(lambda: [t.to("cuda") for t in torch.linalg.eigh(A.cpu())])
                rows.append(dict(n=n, dtype=str(dtype), batch=batch, backend="host LAPACK + copies", eigh_ms=cpu,
                                 eigvalsh_ms=wall_ms(lambda: torch.linalg.eigvalsh(A.cpu()).to("cuda"))))
                for r in rows[-3:]:
                    print(f"n {n:4d} {str(dtype):14s} batch {batch}  {r['backend']:22s} eigh {r['eigh_ms']:8.3f} ms  "
                          f"eigvalsh {r['eigvalsh_ms']:8.3f} ms", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "eigh_options_gpu.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cpu_threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
