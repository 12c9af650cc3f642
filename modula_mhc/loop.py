"""The training loop's reusable parts: the learning-rate schedule, the loss, one optimizer step
after another (:func:`train_steps`) and the loss estimate.

:func:`modula_mhc.train.train` drives them with checkpoints and outputs around them; the examples
and the torchrun example drive the same steps with their own bookkeeping.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import CharCorpus

__all__ = ["StepResult", "estimate_loss", "loss_of", "lr_at", "train_steps"]


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then
    the schedule's multiplier m(p) of progress p ∈ [0, 1): linear 1 − p, cosine ½(1 + cos πp), constant 1."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


def loss_of(model, x, y, autocast_dtype, device) -> torch.Tensor:
    """Mean next-character cross-entropy (nats/char); logits cast to fp32 before the softmax."""
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


#: the seed of the evaluation windows: fixed, not the run's seed (it was seed + 1_000_003, so runs
#: with different seeds were scored on different windows; seed-0 runs keep theirs)
EVAL_SEED = 1_000_003


@torch.no_grad()
def estimate_loss(model, corpus: CharCorpus, config: TrainConfig, device, autocast_dtype) -> dict:
    """Mean loss on ``eval_batches`` batches per split, drawn from a fixed seed so every evaluation
    sees the same windows (curves are comparable across steps and across runs, whatever their
    ``seed``)."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(EVAL_SEED)
        losses = [loss_of(model, *corpus.batch(split, config.batch, config.context, gen, device),
                          autocast_dtype, device).item()
                  for _ in range(config.eval_batches)]
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def _grad_norm(model) -> torch.Tensor:
    """Global 2-norm of the gradients (fp32); 0 when no parameter has one."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class StepResult(NamedTuple):
    """What one optimizer step of :func:`train_steps` reports."""

    loss: float          # the batch's cross-entropy before the step (nats/token)
    grad_norm: float     # global 2-norm of the gradients (nan when not measured)
    lr: float
    seconds: float       # wall time of the step, batch sampling included
    skipped: bool        # the optimizer's non-finite policy skipped the step


def train_steps(model, optimizer, batches: Iterable, lr_of: Callable[[int], float], start: int = 0,
                autocast_dtype=None, device=None, grad_norm: bool = True) -> Iterator[StepResult]:
    """The training loop's body, one optimizer step per (x, y) drawn from ``batches``: the learning
    rate of step t is ``lr_of(t)`` (t = start, start + 1, …), then forward, cross-entropy (fp32
    logits), backward, optimizer step (its non-finite policy decides what a NaN gradient does), zero
    grads. A generator: the caller stops by not asking for more, and between two steps evaluates,
    checkpoints or records whatever it needs (:func:`modula_mhc.train.train` does; so do the examples).
    ``model`` is what runs the forward pass (a DDP wrapper is fine); ``grad_norm=False`` skips the
    norm (sharded gradients)."""
    device = device if device is not None else next(model.parameters()).device
    batches = iter(batches)
    for step in itertools.count(start):
        t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            return
        lr = lr_of(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_of(model, x, y, autocast_dtype, device)
        loss.backward()
        norm = _grad_norm(model) if grad_norm else None  # logged; what a NaN does is the optimizer's policy
        skipped_before = getattr(optimizer, "skipped_steps", 0)  # AdamW keeps no count
        optimizer.step()
        skipped = getattr(optimizer, "skipped_steps", 0) > skipped_before
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        yield StepResult(loss.item(), math.nan if norm is None else norm.item(), lr, seconds, skipped)
