"""One training step of a GPT with a plain residual vs mHC, the mHC one with the mixing passes of
its default CPU backend and with the pure-PyTorch reference, interleaved in one process.

A step is forward + backward + DualizeRetract (Muon) on char-level text (tinyshakespeare with
--data, else the embedded corpus). The three models take turns, one step each; the medians of CPU
time are reported with the mHC/plain ratios. Writes benchmarks/results/mhc_train_step.json.

    python benchmarks/bench_mhc_train_step.py --data tinyshakespeare.txt
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from modula_mhc import compounds, optim  # noqa: E402
from modula_mhc.data import CharCorpus, default_corpus, load_text  # noqa: E402
from modula_mhc.kernels import cpu_mix  # noqa: E402

from _report import add_malloc_option, apply_malloc  # noqa: E402
from bench_train_step import train_step  # noqa: E402 (the same step the optimizer benchmarks time)

#: name → (residual, MODULA_MHC_KERNELS while it steps)
VARIANTS = {"plain": ("plain", ""), "mhc": ("mhc", ""), "mhc, PyTorch reference": ("mhc", "reference")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="text file (default: the embedded corpus)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--warm-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    add_malloc_option(ap)
    args = ap.parse_args()
    malloc = apply_malloc(args)
    torch.set_num_threads(args.threads)
    corpus = CharCorpus.from_text(load_text(args.data) if args.data else default_corpus(), 64)
    runs = {}
    for name, (residual, _) in VARIANTS.items():
        torch.manual_seed(0)
        extra = {} if residual == "plain" else {"streams": args.streams}
        gpt = compounds.GPT(corpus.vocab_size, 64, args.width, args.depth, 4, residual=residual, **extra)
        runs[name] = (gpt, optim.DualizeRetract(gpt, lr=0.054))
    g = torch.Generator().manual_seed(0)

    def step(name):
        os.environ["MODULA_MHC_KERNELS"] = VARIANTS[name][1]
        gpt, opt = runs[name]
        x, y = corpus.batch("train", 12, 64, generator=g)
        t = time.process_time()
        train_step(gpt, opt, x, y)
        return time.process_time() - t

    previous = os.environ.get("MODULA_MHC_KERNELS")
    try:
        for _ in range(args.warm_steps):
            for name in runs:
                step(name)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name in runs:
                times[name].append(step(name))
    finally:
        os.environ.pop("MODULA_MHC_KERNELS", None)
        if previous is not None:
            os.environ["MODULA_MHC_KERNELS"] = previous
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(f"GPT width {args.width}, depth {args.depth}, {args.streams} streams, batch 12×64, Muon, "
          f"{args.threads} thread(s), CPU time, median of {args.repeats} interleaved steps "
          f"(C passes: {cpu_mix.unavailable_reason() or 'built'})")
    for name, v in ms.items():
        print(f"{name:24s} {v:8.1f} ms   × plain {v / ms['plain']:.2f}")
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = dict(width=args.width, depth=args.depth, streams=args.streams, threads=args.threads, malloc=malloc,
                torch=torch.__version__, c_passes=cpu_mix.unavailable_reason() or "built")
    (out / "mhc_train_step.json").write_text(json.dumps(dict(meta=meta, median_ms=ms), indent=2))
    print(f"wrote {out / 'mhc_train_step.json'}")


if __name__ == "__main__":
    main()
