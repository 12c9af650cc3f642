"""Data-parallel (DDP) or sharded (FSDP2) training of the char-level GPT with
DistributedDualizeRetract, launched by torchrun:

    torchrun --nproc_per_node=2 examples/torchrun_train.py --preset tiny --steps 100
    torchrun --nproc_per_node=2 examples/torchrun_train.py --preset tiny --steps 100 --fsdp

It reuses the pieces of ``modula-mhc train``: TrainConfig, the model, and the loop's steps
(``modula_mhc.loop.train_steps``: schedule, loss, backward, optimizer step), with the evaluation and
atomic checkpoints around them; each rank draws its own batch (seed + rank), so the global batch is
``--batch`` × world size.
Rank 0 prints the losses and writes ``<out>/ckpt.pt`` (weights and the full optimizer state).
On CPU it uses the gloo backend, on GPUs nccl; ``--dist-timeout`` bounds how long a rank waits
for a stuck one. ``modula-mhc sample <out>`` samples from the checkpoint. See docs/distributed.md.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys

import torch
import torch.distributed as dist

from modula_mhc.data import DEFAULT_CORPUS_NAME, CharCorpus, default_corpus, load_text
from modula_mhc.distributed import DistributedDualizeRetract
from modula_mhc.loop import estimate_loss, lr_at, train_steps
from modula_mhc.train import TrainConfig, build_model, resolve_config, save_checkpoint


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="a UTF-8 text file [embedded stdlib corpus]")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="sequences per rank")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--manifolds", default=None, help="hetero | muon | all-stiefel | ...")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 fully_shard (default: DDP)")
    p.add_argument("--out", default="runs/torchrun")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long a collective waits for the other ranks before failing [600]")
    args = p.parse_args(argv)
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        p.error(f"--dist-timeout: must be a positive number of seconds, got {args.dist_timeout}")
    return args


def main(argv=None):
    args = parse(argv)
    config = resolve_config(TrainConfig(preset=args.preset, data=args.data, steps=args.steps, batch=args.batch,
                                        lr=args.lr, manifolds=args.manifolds, eval_every=args.eval_every,
                                        out=args.out, quiet=True))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # one thread per rank: the ranks share the machine's cores
    try:
        text = default_corpus() if config.data is None else load_text(config.data)
        corpus = CharCorpus.from_text(text, config.context, source=config.data or DEFAULT_CORPUS_NAME)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = build_model(config, corpus.vocab_size).to(device)
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard
            fully_shard(model)
            forward = model
        else:
            from torch.nn.parallel import DistributedDataParallel
            forward = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        opt = DistributedDualizeRetract(model, lr=config.lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay, nonfinite=config.nonfinite)
        data = torch.Generator().manual_seed(config.seed + rank)  # each rank its own batches
        batches = (corpus.batch("train", config.batch, config.context, data, device) for _ in itertools.count())
        steps = train_steps(forward, opt, batches, lambda t: lr_at(t, config), device=device, grad_norm=False)
        for step, result in enumerate(itertools.islice(steps, config.steps)):
            last = step + 1 == config.steps
            if (step + 1) % config.eval_every == 0 or last:
                losses = estimate_loss(forward, corpus, config, device, None)  # every rank (FSDP needs all)
                weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                           for k, v in model.state_dict().items()}
                optimizer_state = opt.full_state_dict()  # a collective: every rank takes part
                if rank == 0:
                    print(f"step {step + 1}: batch loss {result.loss:.4f}, val loss {losses['val']:.4f} "
                          f"({world} ranks, {'FSDP2' if args.fsdp else 'DDP'})", flush=True)
                    save_checkpoint(os.path.join(config.out, "ckpt.pt"), {
                        "config": config.to_dict(), "vocab": corpus.vocab, "step": step + 1, "model": weights,
                        "optimizer": optimizer_state, "rng": {"data": data.get_state()},
                        "history": {}, "world_size": world})
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
