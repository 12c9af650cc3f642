"""Train a character-level GPT with the dualize-then-retract optimizer (or AdamW as a baseline).

    from modula_mhc.train import TrainConfig, train
    metrics = train(TrainConfig(preset="tiny", steps=100, quiet=True))
    metrics["final"]["val_loss"]

or from a shell: ``modula-mhc train --preset tiny``; ``modula-mhc sample RUN`` samples from a run.

The loop reads like nanoGPT's: sample a batch, forward, cross-entropy, backward, optimizer step,
with the learning rate set every step from a schedule; every ``eval_every`` steps it estimates the
train and validation loss on ``eval_batches`` fixed batches and writes a checkpoint atomically to
``<out>/ckpt.pt``. Every step is appended to ``metrics.jsonl``; at the end it writes
``metrics.json``, ``loss.png`` and ``sample.txt``. Configuration: :mod:`modula_mhc.config`;
checkpoints and run directories: :mod:`modula_mhc.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import threading
import time

import torch
import torch.nn.functional as F

from .checkpoint import (CheckpointError, RunDirectory, atomic_write, find_checkpoint, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import MANIFOLD_PRESETS, ConfigError, TrainConfig, resolve_config
from .data import DEFAULT_CORPUS_NAME, CharCorpus, default_corpus, load_text
from .outputs import MetricsLog, Progress, plot_losses, write_json

__all__ = ["TrainConfig", "ConfigError", "CheckpointError", "Interrupted", "train", "sample", "build_model",
           "build_optimizer", "lr_at", "loss_of", "estimate_loss", "generate", "resolve_config",
           "load_checkpoint", "save_checkpoint", "atomic_write"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: metrics, plot and a checkpoint of the steps done were written."""


# ---------------------------------------------------------------------------------- model, optimizer, schedule

def build_model(config: TrainConfig, vocab_size: int):
    """The GPT (or CharMLP) of the config, weights initialised from the global torch RNG (seeded by
    the caller)."""
    from .compounds import GPT, CharMLP
    attn, mlp = MANIFOLD_PRESETS[config.manifolds][:2]
    if config.model == "mlp":  # depth = number of Linear atoms; the MLP preset manifold applies
        return CharMLP(vocab_size, config.width, config.depth, ngram=config.ngram, manifold=mlp)
    kwargs = {} if config.residual == "plain" else {"streams": config.streams}
    return GPT(vocab_size, config.context, config.width, config.depth, config.heads, residual=config.residual,
               attn_manifold=attn, mlp_manifold=mlp, **kwargs)


def build_optimizer(config: TrainConfig, model):
    """DualizeRetract over the module tree (per-atom step sizes from the modular norm; its
    ``nonfinite`` policy is the run's), or AdamW as a baseline."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                 weight_decay=config.weight_decay)
    from .optim import DualizeRetract
    return DualizeRetract(model, lr=config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay, nonfinite=config.nonfinite)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------- loss and sampling

def loss_of(model, x, y, autocast_dtype, device) -> torch.Tensor:
    """Mean next-character cross-entropy (nats/char); logits cast to fp32 before the softmax."""
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model, corpus: CharCorpus, config: TrainConfig, device, autocast_dtype) -> dict:
    """Mean loss on ``eval_batches`` batches per split, drawn from a fixed seed so every evaluation
    sees the same windows (curves are comparable across steps and across runs)."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(config.seed + 1_000_003)
        losses = [loss_of(model, *corpus.batch(split, config.batch, config.context, gen, device),
                          autocast_dtype, device).item()
                  for _ in range(config.eval_batches)]
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


@torch.no_grad()
def generate(model, prompt: torch.Tensor, n: int, context: int, generator: torch.Generator,
             temperature: float = 1.0) -> torch.Tensor:
    """Sample n ids autoregressively: next ~ softmax(logits(last ≤ context ids) / temperature)."""
    was_training = model.training
    model.eval()
    ids = prompt.reshape(1, -1)
    for _ in range(n):
        logits = model(ids[:, -context:])[0, -1].float() / temperature
        probs = torch.softmax(logits, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt.reshape(1, 1)], dim=1)
    model.train(was_training)
    return ids[0, prompt.numel():]


def sample(checkpoint, chars: int = 500, prompt: str | None = None, temperature: float = 1.0, seed: int = 0,
           device: str = "auto") -> str:
    """``chars`` characters sampled from the model of a checkpoint file or run directory (after
    ``prompt``; default: a newline). Bad arguments raise ConfigError, a bad file CheckpointError."""
    if not isinstance(chars, int) or isinstance(chars, bool) or chars < 0:
        raise ConfigError("chars", f"must be a non-negative integer, got {chars!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError("temperature", f"must be a positive finite number, got {temperature!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ConfigError("seed", f"must be a non-negative integer below 2**63, got {seed!r}")
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError("device", f"must be auto, cpu or cuda (with CUDA available), got {device!r}")
    path = find_checkpoint(checkpoint, None)
    ckpt = load_checkpoint(path)
    config = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    vocab = ckpt["vocab"]
    prompt = ("\n" if "\n" in vocab else vocab[0]) if prompt is None else prompt
    unknown = sorted(set(prompt) - set(vocab))
    if not prompt or unknown:
        raise ConfigError("prompt", f"must be non-empty text in the checkpoint's vocabulary; {''.join(unknown)!r} "
                                    "is not" if unknown else "must not be empty")
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, len(vocab))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r} does not fit its model: {str(e).splitlines()[0][:200]}") from None
    table = {ch: i for i, ch in enumerate(vocab)}
    ids = generate(model.to(dev), torch.tensor([table[c] for c in prompt], device=dev), chars, config.context,
                   torch.Generator().manual_seed(seed), temperature)
    return "".join(vocab[i] for i in ids.tolist())


# ---------------------------------------------------------------------------------- the run

def _load_corpus(config: TrainConfig, vocab: str | None = None) -> CharCorpus:
    if config.data is None:
        return CharCorpus.from_text(default_corpus(), config.context, source=DEFAULT_CORPUS_NAME, vocab=vocab)
    return CharCorpus.from_text(load_text(config.data), config.context, source=os.fspath(config.data), vocab=vocab)


def _all_finite(model, optimizer) -> bool:
    tensors = list(model.parameters()) + [v for s in optimizer.state.values() for v in s.values()
                                          if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _StopOnSigint:
    """While active (main thread only), the first Ctrl-C sets ``requested`` so the loop stops after
    the current step with a consistent state; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):  # no printing here: a handler may interrupt a print
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def train(config: TrainConfig | None = None, callback=None) -> dict:
    """Run (or resume) training and return the metrics dict that is also written to metrics.json.

    ``callback(info)``, if given, is called after every evaluation with a dict holding ``step``,
    ``train_loss``, ``val_loss``, ``model``, ``optimizer`` and ``config`` (for diagnostics such as
    singular values over training). Raises ConfigError / DataError / CheckpointError on bad input,
    FloatingPointError when training diverges, :class:`Interrupted` on Ctrl-C."""
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    ckpt = ckpt_path = None
    if config.resume:
        ckpt_path = find_checkpoint(config.resume, config.out)
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("world_size", 1) != 1 or "torch" not in ckpt["rng"]:
            raise CheckpointError(f"checkpoint {ckpt_path!r} comes from a {ckpt.get('world_size', '?')}-rank "
                                  "distributed run, which `train --resume` cannot continue; "
                                  f"`modula-mhc sample {ckpt_path}` samples from it")
        out = config.out or os.path.dirname(os.path.abspath(ckpt_path))  # the run may have been moved
        config = dataclasses.replace(resolve_config(config, ckpt["config"]), out=out)
        if config.steps <= ckpt["step"]:
            raise ConfigError("steps", f"checkpoint {ckpt_path!r} has done {ckpt['step']} steps already; "
                                       f"pass --steps greater than {ckpt['step']} to continue it")
    else:
        config = resolve_config(config)
        if config.out is None:
            config = dataclasses.replace(config, out=os.path.join("runs", config.name or time.strftime("%Y%m%d-%H%M%S")))
    previous_threads = torch.get_num_threads()
    with RunDirectory(config.out, fresh=ckpt is None, force=config.force) as run_dir:
        if config.threads and resolve_device(config.device).type == "cpu":
            torch.set_num_threads(config.threads)
        try:
            return _run(config, ckpt, ckpt_path, run_dir, callback)
        finally:
            torch.set_num_threads(previous_threads)


def _run(config: TrainConfig, ckpt, ckpt_path, run_dir: RunDirectory, callback) -> dict:
    """The loop of :func:`train` for a resolved config, a locked run directory and the checkpoint
    it resumes (if any)."""
    device = resolve_device(config.device)
    autocast_dtype = torch.bfloat16 if config.dtype == "bfloat16" else None

    # -- data, model, optimizer (initialisation from the seed; a checkpoint then overwrites the state)
    corpus = _load_corpus(config, vocab=ckpt["vocab"] if ckpt else None)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(config, corpus.vocab_size).to(device)
    optimizer = build_optimizer(config, model)
    data_gen = torch.Generator().manual_seed(config.seed)
    history = {"step": [], "train_loss": [], "grad_norm": [], "lr": [], "eval": []}
    step, tokens_seen, train_seconds = 0, 0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path!r} does not fit the model/optimizer: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        set_rng_state(ckpt["rng"])
        data_gen.set_state(ckpt["rng"]["data"])
        history = ckpt["history"]
        step, tokens_seen, train_seconds = ckpt["step"], ckpt["tokens_seen"], ckpt["train_seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = config.batch * config.context
    checkpointed = {"step": step if ckpt else None}

    def skipped_steps():  # the optimizer's non-finite policy keeps this count (AdamW has none)
        return getattr(optimizer, "skipped_steps", 0)

    def checkpoint():
        if not _all_finite(model, optimizer):
            last = checkpointed["step"]
            raise FloatingPointError(f"step {step}: the weights are no longer finite (training diverged; try a "
                                     f"smaller --lr or --weight-decay); " + ("no checkpoint was written" if last is None
                                     else f"the last good checkpoint (step {last}) is kept"))
        save_checkpoint(run_dir.file("ckpt.pt"), {
            "config": config.to_dict(), "vocab": corpus.vocab, "step": step, "tokens_seen": tokens_seen,
            "train_seconds": train_seconds, "skipped_steps": skipped_steps(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": {**rng_state(), "data": data_gen.get_state()}, "history": history,
        })
        checkpointed["step"] = step

    def evaluate():
        losses = estimate_loss(model, corpus, config, device, autocast_dtype)
        record = {"step": step, "train": losses["train"], "val": losses["val"]}
        history["eval"].append(record)
        log.eval(record)
        progress.write(f"step {step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if callback is not None:
            callback({"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "model": model,
                      "optimizer": optimizer, "config": config})

    def finish(status):
        """Sample (completed runs only), plot and metrics.json of the steps done."""
        sample_text = ""
        if config.sample_chars and status == "completed":
            prompt = corpus.encode("\n" if "\n" in corpus.vocab else corpus.vocab[0]).to(device)
            ids = generate(model, prompt, config.sample_chars, config.context, torch.Generator().manual_seed(config.seed))
            sample_text = corpus.decode(ids.tolist())
            atomic_write(run_dir.file("sample.txt"), lambda f: f.write(sample_text.encode()))
        title = (f"{config.optimizer} lr={config.lr:g} {config.manifolds} | w{config.width} d{config.depth} "
                 f"h{config.heads} T{config.context} B{config.batch} | {corpus.source}")
        plotted = plot_losses(run_dir.file("loss.png"), history, title)
        first, final = (history["eval"][0], history["eval"][-1]) if history["eval"] else ({}, {})
        metrics = {
            "status": status, "config": config.to_dict(),
            "data": {"source": corpus.source, "chars": len(corpus.train) + len(corpus.val),
                     "vocab_size": corpus.vocab_size},
            "parameters": n_params, "device": str(device), "steps": step,
            "initial": {k: first.get(k) for k in ("train", "val")},
            "final": {"step": final.get("step"), "train_loss": final.get("train"), "val_loss": final.get("val"),
                      "last_batch_loss": history["train_loss"][-1] if history["train_loss"] else None},
            "tokens_seen": tokens_seen, "train_seconds": train_seconds,
            "tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 else None,
            "skipped_steps": skipped_steps(), "history": history,
            "files": {"checkpoint": "ckpt.pt" if checkpointed["step"] is not None else None,
                      "log": "metrics.jsonl", "sample": "sample.txt" if sample_text else None,
                      "plot": "loss.png" if plotted else None},
        }
        write_json(run_dir.file("metrics.json"), metrics)
        return metrics, sample_text

    progress = Progress(config.quiet)
    if ckpt is not None and ckpt["config"].get("threads") != config.threads:
        progress.write(f"note: --threads {config.threads} (the checkpoint used {ckpt['config'].get('threads')}): "
                       "the continuation is correct but not bit-identical to an uninterrupted run")
    progress.write(f"modula-mhc train: {f'resumed from {ckpt_path} at step {step}' if ckpt else 'new run'}; "
                   f"{n_params:,} parameters, vocab {corpus.vocab_size} ({corpus.source}, "
                   f"{len(corpus.train) + len(corpus.val):,} chars), device {device}, out {run_dir.path}")
    log = MetricsLog(run_dir.file("metrics.jsonl"), history)
    consecutive_skips, consistent = 0, True  # consistent: no step is half done (safe to checkpoint)
    session_tokens, session_seconds = 0, 0.0  # this process only, for the progress bar's tokens/s
    try:
        with _StopOnSigint() as sigint:
            if not history["eval"]:
                evaluate()
            model.train()
            progress.start(config.steps, step)
            while step < config.steps and not sigint.requested:
                t0 = time.perf_counter()
                consistent = False
                lr = lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = corpus.batch("train", config.batch, config.context, data_gen, device)
                loss = loss_of(model, x, y, autocast_dtype, device)
                loss.backward()
                grad_norm = torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]))
                skipped_before = skipped_steps()
                optimizer.step()  # the optimizer's non-finite policy: skip (and warn) or raise
                consecutive_skips = consecutive_skips + 1 if skipped_steps() > skipped_before else 0
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                train_seconds, tokens_seen, step = train_seconds + dt, tokens_seen + tokens_per_step, step + 1
                session_seconds, session_tokens = session_seconds + dt, session_tokens + tokens_per_step
                loss_value, grad_norm_value = loss.item(), grad_norm.item()
                for key, value in (("step", step), ("train_loss", loss_value), ("grad_norm", grad_norm_value),
                                   ("lr", lr)):
                    history[key].append(value)
                log.step(step, loss_value, grad_norm_value, lr)
                consistent = True
                progress.update(loss_value, session_tokens / session_seconds if session_seconds > 0 else float("nan"))
                if consecutive_skips >= config.max_nonfinite:
                    raise FloatingPointError(f"step {step}: {consecutive_skips} optimizer steps in a row skipped for "
                                             "non-finite gradients; training diverged — try a smaller --lr")
                if step % config.eval_every == 0 or step == config.steps:
                    evaluate()
                    checkpoint()
            if sigint.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        progress.close()
        if consistent and checkpointed["step"] != step and _all_finite(model, optimizer):
            checkpoint()
        finish("interrupted")
        raise Interrupted(f"interrupted at step {step} of {config.steps}; checkpoint (step {checkpointed['step']}), "
                          f"metrics and plot are in {run_dir.path}/") from None
    except FloatingPointError:
        progress.close()
        finish("diverged")
        raise
    finally:
        progress.close()
        log.close()

    metrics, sample_text = finish("completed")
    if not config.quiet:
        if sample_text:
            print(f"\n--- sample ({config.sample_chars} chars) ---\n{sample_text}\n---", flush=True)
        rate, final = metrics["tokens_per_s"], metrics["final"]
        print(f"final: train loss {final['train_loss']:.4f}, val loss {final['val_loss']:.4f}, "
              f"{rate:,.0f} tokens/s; outputs in {run_dir.path}/" if rate else f"outputs in {run_dir.path}/", flush=True)
    return metrics
