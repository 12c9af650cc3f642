"""Host syncs and where the time goes in one Hetero optimizer step on the GPU (CUDA only).

The dual loop is meant to keep the host out of its iterations: it tests its stopping rule every
CHECK_EVERY["accelerator"] iterations. This trains the anchor GPT with Hetero for --warm-steps
steps, then counts the synchronising CUDA calls of one ``opt.step()`` (torch's sync debug mode)
against the dual iterations it ran, and prints the profiler's top CUDA and CPU ops of one step.
Writes benchmarks/results/gpu_sync_check.json (and the profile table as .txt).

    python benchmarks/gpu_sync_check.py [--warm-steps 20]
"""
import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc.data import CharCorpus, default_corpus  # noqa: E402
from modula_mhc.manifolds import dual_ascent  # noqa: E402

from bench_train_step import PRESETS, backward, make  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_sync_check.py needs CUDA")
    dev = args.device
    cfg = PRESETS["anchor"]
    corpus = CharCorpus.from_text(default_corpus(), cfg["context"])
    gpt, opt = make("hetero", cfg, corpus.vocab_size, dev)
    g = torch.Generator().manual_seed(1)

    def loss_and_grad():
        x, y = (t.to(dev) for t in corpus.batch("train", cfg["batch"], cfg["context"], generator=g))
        backward(gpt, x, y)

    for _ in range(args.warm_steps):
        loss_and_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss_and_grad()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    if dev == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    diag = opt.diagnostics()
    iters = {k: int(d["iterations"]) for k, d in diag.items() if d["manifold"] in ("stiefel", "dgram")}
    opt.zero_grad(set_to_none=True)
    # one profiled step (forward, backward, optimizer)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        loss_and_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    total_iters = sum(iters.values())
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "warm_steps": args.warm_steps,
           "check_every": dual_ascent.CHECK_EVERY, "syncs_in_one_step": len(syncs), "dual_iterations": iters,
           "total_dual_iterations": total_iters, "sync_messages": sorted(set(syncs))[:20]}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "gpu_sync_check.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(RESULTS, "gpu_sync_check_profile.txt"), "w") as f:
        f.write(table + "\n\n" + cpu_table + "\n")
    print(table)
    print(cpu_table)
    print(f"one Hetero optimizer step: {len(syncs)} synchronising calls, {total_iters} dual iterations over "
          f"{len(iters)} matrices (check every {dual_ascent.CHECK_EVERY['accelerator']} on the GPU)")


if __name__ == "__main__":
    main()
