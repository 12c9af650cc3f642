"""msign on the GPU: Triton against the PyTorch reference over the shapes training uses (CUDA only).

The dispatcher sends CUDA tensors to the Triton msign; this measures, per shape and dtype, which
of the two is faster (median of CUDA-event timings, rotated inputs, after warm-up and autotuning)
and checks that both give the same polar factor. Writes benchmarks/results/msign_shapes_gpu.json.

    python benchmarks/gpu_msign_shapes.py
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc.kernels import reference, triton_msign  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: (batch, rows, cols): the anchor GPT's Q/K/V/O stack and its MLP stack, a GPT-2-small-sized
#: stack, single large matrices
SHAPES = [(16, 128, 128), (8, 128, 512), (48, 768, 768), (24, 768, 3072), (1, 1024, 1024), (1, 4096, 4096)]
DTYPES = [torch.float32, torch.bfloat16]


def median_ms(fn, inputs, reps=15):
    from triton.testing import do_bench
    i = [0]

    def once():
        i[0] = (i[0] + 1) % len(inputs)
        fn(inputs[i[0]])
    return do_bench(once, warmup=25, rep=max(50, reps * 5), return_mode="median")


def main():
    if not torch.cuda.is_available():
        raise SystemExit("gpu_msign_shapes.py needs CUDA")
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES:
            inputs = [torch.randn(*shape, device="cuda").to(dtype) for _ in range(3)]
            ref = reference.msign(inputs[0].float(), 8)
            err = float((triton_msign.msign(inputs[0], 8).float() - ref).norm() / ref.norm())
            t_ref = median_ms(lambda X: reference.msign(X, 8), inputs)
            t_tri = median_ms(lambda X: triton_msign.msign(X, 8), inputs)
            rows.append({"shape": list(shape), "dtype": str(dtype), "reference_ms": t_ref, "triton_ms": t_tri,
                         "reference_over_triton": t_ref / t_tri, "triton_rel_err_vs_fp32_reference": err})
            print(f"{str(dtype):15s} {str(shape):18s} reference {t_ref:8.3f} ms  triton {t_tri:8.3f} ms  "
                  f"ref/triton {t_ref / t_tri:5.2f}  rel err {err:.1e}", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "msign_shapes_gpu.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": 8, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
