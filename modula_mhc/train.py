"""Train a character-level GPT with the dualize-then-retract optimizer (or AdamW as a baseline).

    from modula_mhc.train import TrainConfig, train
    metrics = train(TrainConfig(preset="tiny", steps=100, quiet=True))
    metrics["final"]["val_loss"]

or from a shell: ``modula-mhc train --preset tiny``; ``modula-mhc sample RUN`` samples from a run.

The loop reads like nanoGPT's: sample a batch, forward, cross-entropy, backward, optimizer step,
with the learning rate set every step from a schedule; every ``eval_every`` steps it estimates the
train and validation loss on ``eval_batches`` fixed batches and writes a checkpoint atomically to
``<out>/ckpt.pt``. Every step is appended to ``metrics.jsonl``; at the end it writes
``metrics.json``, ``loss.png`` and ``sample.txt``. Configuration and model: :mod:`modula_mhc.config`;
checkpoints and run directories: :mod:`modula_mhc.checkpoint`; sampling: :mod:`modula_mhc.sampling`.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import signal
import sys
import threading
import time

import torch

from .checkpoint import (
    CheckpointError,
    RunDirectory,
    atomic_write,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, build_model, resolve_config, resolve_device
from .data import DEFAULT_CORPUS_NAME, CharCorpus, DataError, default_corpus, load_text, text_sha256
from .loop import StepResult, estimate_loss, loss_of, lr_at, train_steps
from .optim import DualizeRetract
from .outputs import MetricsLog, Progress, plot_losses, write_json
from .sampling import generate, sample

__all__ = ["TrainConfig", "ConfigError", "CheckpointError", "Interrupted", "train", "train_steps", "StepResult",
           "sample", "build_model", "build_optimizer", "lr_at", "loss_of", "estimate_loss", "generate",
           "resolve_config", "load_checkpoint", "save_checkpoint", "atomic_write"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: metrics, plot and a checkpoint of the steps done were written."""


# ---------------------------------------------------------------------------------- optimizer

def build_optimizer(config: TrainConfig, model):
    """DualizeRetract over the module tree (per-atom step sizes from the modular norm; its
    ``nonfinite`` policy is the run's), or AdamW as a baseline."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                 weight_decay=config.weight_decay)
    return DualizeRetract(model, lr=config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay, nonfinite=config.nonfinite)


# ---------------------------------------------------------------------------------- the run

def _load_corpus(config: TrainConfig, ckpt: dict | None = None, ckpt_path=None, data_given: bool = True) -> CharCorpus:
    """The run's corpus; a resumed run's text is checked against its checkpoint first (``_check_data``),
    before it is tokenised with the checkpoint's vocabulary."""
    if config.data is None:
        text, source = default_corpus(), DEFAULT_CORPUS_NAME
    else:
        source = os.fspath(config.data)
        try:
            text = load_text(config.data)
        except DataError as e:
            if ckpt_path is None or data_given or os.path.isabs(config.data):
                raise
            raise DataError(f"{e} (checkpoint {ckpt_path!r} names it relative to the directory the run started "
                            "in; pass --data with its path from here)") from None
    if ckpt is not None:
        _check_data(text, source, ckpt, ckpt_path)
    return CharCorpus.from_text(text, config.context, source=source, vocab=ckpt["vocab"] if ckpt else None)


def _check_data(text: str, source: str, ckpt: dict, ckpt_path) -> None:
    """A resumed run must read the text its checkpoint was trained on (same sha256; checkpoints
    older than the recorded hash are not checked): other text under the same name — an edited file,
    another file of that name, another Python's standard library — would not continue the run."""
    expected = ckpt.get("data_sha256")
    if expected is not None:
        actual = text_sha256(text)
        if actual != expected:
            raise _data_mismatch(source, actual, expected, ckpt_path)


def _data_mismatch(source: str, actual: str, expected: str, ckpt_path) -> ConfigError:
    what = ("the embedded corpus of this Python differs from the one" if source == DEFAULT_CORPUS_NAME
            else f"{source!r} is not the text")
    return ConfigError("data", f"{what} checkpoint {ckpt_path!r} was trained on (sha256 {actual[:12]}... instead "
                               f"of {expected[:12]}...); restore that text (or give its path with --data) to "
                               "continue the run, or start a new run")


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


def _resume(config: TrainConfig):
    """(resolved config, checkpoint, its path) for ``config.resume``. The run directory is ``--out``,
    else ``runs/<--name>`` (as for a new run), else the checkpoint's own directory."""
    out = config.out or (os.path.join("runs", config.name) if config.name else None)
    ckpt_path = find_checkpoint(config.resume, out)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("world_size", 1) != 1 or "torch" not in ckpt["rng"]:
        raise CheckpointError(f"checkpoint {ckpt_path!r} comes from a {ckpt.get('world_size', '?')}-rank "
                              "distributed run, which `train --resume` cannot continue; "
                              f"`modula-mhc sample {ckpt_path}` samples from it")
    out = out or os.path.dirname(os.path.abspath(ckpt_path))  # the run may have been moved
    saved = dict(ckpt["config"])
    # the data is its content: --data may name the same text by another path (a run started with a
    # relative path, resumed from another directory); train() reads it next and _check_data refuses
    # other text before the run directory is touched
    if config.data is not None and saved.get("data") is not None and ckpt.get("data_sha256") is not None:
        saved["data"] = config.data
    config = dataclasses.replace(resolve_config(config, saved), out=out)
    if config.steps <= ckpt["step"]:
        raise ConfigError("steps", f"checkpoint {ckpt_path!r} has done {ckpt['step']} steps already; "
                                   f"pass --steps greater than {ckpt['step']} to continue it")
    return config, ckpt, ckpt_path


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
    data_given = config.data is not None
    if config.resume:
        config, ckpt, ckpt_path = _resume(config)
    else:
        config = resolve_config(config)
        if config.out is None:
            name = config.name or time.strftime("%Y%m%d-%H%M%S")
            config = dataclasses.replace(config, out=os.path.join("runs", name))
    # the data is read before the run directory is touched: a mistyped --data with --force must not
    # delete the old run and then fail
    corpus = _load_corpus(config, ckpt, ckpt_path, data_given)
    previous_threads = torch.get_num_threads()
    # a resumed run continues in its own directory; another directory must not hold a run already
    own_dir = ckpt is not None and os.path.realpath(config.out) == os.path.realpath(os.path.dirname(ckpt_path) or ".")
    with RunDirectory(config.out, fresh=not own_dir, force=config.force,
                      resumes=ckpt_path if own_dir else None) as run_dir:
        if config.threads and resolve_device(config.device).type == "cpu":
            torch.set_num_threads(config.threads)
        try:
            return _run(config, corpus, ckpt, ckpt_path, run_dir, callback)
        finally:
            torch.set_num_threads(previous_threads)


def _print(text: str) -> None:
    """print, with what stdout's encoding cannot show (a UTF-8 sample on an ASCII terminal) escaped:
    the run is done and written, so a report must not fail it."""
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)


class _Run:
    """The state of one run — data, model, optimizer, history, counters — and what it does besides
    stepping: evaluate, checkpoint, finish. Built from the seed; a checkpoint then overwrites it."""

    def __init__(self, config: TrainConfig, corpus: CharCorpus, ckpt, ckpt_path, run_dir: RunDirectory, callback):
        self.config, self.run_dir, self.callback = config, run_dir, callback
        self.device = resolve_device(config.device)
        self.autocast_dtype = torch.bfloat16 if config.dtype == "bfloat16" else None
        self.corpus = corpus
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model = build_model(config, self.corpus.vocab_size).to(self.device)
        self.optimizer = build_optimizer(config, self.model)
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.history = {"step": [], "train_loss": [], "grad_norm": [], "lr": [], "eval": []}
        self.step, self.tokens_seen, self.train_seconds, self.checkpointed = 0, 0, 0.0, None
        if ckpt is not None:
            try:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {ckpt_path!r} does not fit the model/optimizer: "
                                      f"{str(e).splitlines()[0][:200]}") from None
            set_rng_state(ckpt["rng"])
            self.data_gen.set_state(ckpt["rng"]["data"])
            self.history = ckpt["history"]
            self.step, self.tokens_seen, self.train_seconds = ckpt["step"], ckpt["tokens_seen"], ckpt["train_seconds"]
            self.checkpointed = self.step
        self.progress = Progress(config.quiet)
        self.log = MetricsLog(run_dir.file("metrics.jsonl"), self.history)

    def announce(self, ckpt, ckpt_path) -> None:
        config, corpus = self.config, self.corpus
        if ckpt is not None:
            # the checkpoint's device as it ran ("auto" may have meant cuda there); older ones lack it
            was = {"threads": ckpt["config"].get("threads"), "dtype": ckpt["config"].get("dtype"),
                   "device": ckpt.get("device") or str(resolve_device(ckpt["config"].get("device") or "auto"))}
            now = {"threads": config.threads, "dtype": config.dtype, "device": str(self.device)}
            changed = [f"--{k} {now[k]} (the checkpoint used {was[k]})" for k in was if was[k] != now[k]]
            if changed:
                self.progress.write(f"note: {', '.join(changed)}: the continuation is correct but not "
                                    "bit-identical to an uninterrupted run")
        where = f"resumed from {ckpt_path} at step {self.step}" if ckpt else "new run"
        self.progress.write(f"modula-mhc train: {where}; {sum(p.numel() for p in self.model.parameters()):,} "
                            f"parameters, vocab {corpus.vocab_size} ({corpus.source}, "
                            f"{len(corpus.train) + len(corpus.val):,} chars), device {self.device}, "
                            f"out {self.run_dir.path}")

    def report(self, metrics: dict, sample_text: str) -> None:
        if self.config.quiet:
            return
        if sample_text:
            _print(f"\n--- sample ({self.config.sample_chars} chars) ---\n{sample_text}\n---")
        rate, final, out = metrics["tokens_per_s"], metrics["final"], self.run_dir.path
        _print(f"final: train loss {final['train_loss']:.4f}, val loss {final['val_loss']:.4f}, "
               f"{rate:,.0f} tokens/s; outputs in {out}/" if rate else f"outputs in {out}/")

    def skipped_steps(self) -> int:  # the optimizer's non-finite policy keeps this count (AdamW has none)
        return getattr(self.optimizer, "skipped_steps", 0)

    def record_step(self, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
        self.step += 1
        self.tokens_seen += self.config.batch * self.config.context
        self.train_seconds += seconds
        for key, value in (("step", self.step), ("train_loss", loss), ("grad_norm", grad_norm), ("lr", lr)):
            self.history[key].append(value)
        self.log.step(self.step, loss, grad_norm, lr)

    def evaluate(self) -> None:
        losses = estimate_loss(self.model, self.corpus, self.config, self.device, self.autocast_dtype)
        # train_seconds: optimizer-step wall time so far (evaluations excluded), for time-to-loss plots
        record = {"step": self.step, "train": losses["train"], "val": losses["val"],
                  "train_seconds": round(self.train_seconds, 3)}
        self.history["eval"].append(record)
        self.log.eval(record)
        self.progress.write(f"step {self.step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if self.callback is not None:
            self.callback({"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                           "model": self.model, "optimizer": self.optimizer, "config": self.config})

    def checkpoint(self) -> None:
        """Write ckpt.pt — only with finite weights and optimizer state (else the run has diverged
        and the last good checkpoint stays)."""
        if not _all_finite(self.model, self.optimizer):
            kept = ("no checkpoint was written" if self.checkpointed is None
                    else f"the last good checkpoint (step {self.checkpointed}) is kept")
            raise FloatingPointError(f"step {self.step}: the weights are no longer finite (training diverged; "
                                     f"try a smaller --lr or --weight-decay); {kept}")
        save_checkpoint(self.run_dir.file("ckpt.pt"), {
            "config": self.config.to_dict(), "device": str(self.device), "vocab": self.corpus.vocab,
            "data_sha256": self.corpus.sha256, "step": self.step,
            "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
            "skipped_steps": self.skipped_steps(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": {**rng_state(), "data": self.data_gen.get_state()},
            "history": self.history,
        })
        self.checkpointed = self.step

    def interrupted(self, consistent: bool) -> Interrupted:
        """After Ctrl-C: a checkpoint of the steps done (when no step is half done and the weights are
        finite), then metrics and plot; returns the exception to raise."""
        self.progress.close()
        if consistent and self.checkpointed != self.step and _all_finite(self.model, self.optimizer):
            self.checkpoint()
        self.finish("interrupted")
        return Interrupted(f"interrupted at step {self.step} of {self.config.steps}; checkpoint (step "
                           f"{self.checkpointed}), metrics and plot are in {self.run_dir.path}/")

    def finish(self, status: str) -> tuple[dict, str]:
        """Sample (completed runs only), plot and metrics.json of the steps done."""
        config, corpus, history = self.config, self.corpus, self.history
        sample_text = ""
        if config.sample_chars and status == "completed":
            prompt = corpus.encode("\n" if "\n" in corpus.vocab else corpus.vocab[0]).to(self.device)
            ids = generate(self.model, prompt, config.sample_chars, config.context,
                           torch.Generator().manual_seed(config.seed))
            sample_text = corpus.decode(ids.tolist())
            atomic_write(self.run_dir.file("sample.txt"), lambda f: f.write(sample_text.encode()))
        title = (f"{config.optimizer} lr={config.lr:g} {config.manifolds} | w{config.width} d{config.depth} "
                 f"h{config.heads} T{config.context} B{config.batch} | {corpus.source}")
        plotted = plot_losses(self.run_dir.file("loss.png"), history, title)
        first, final = (history["eval"][0], history["eval"][-1]) if history["eval"] else ({}, {})
        metrics = {
            "status": status, "config": config.to_dict(),
            "data": {"source": corpus.source, "chars": len(corpus.train) + len(corpus.val),
                     "vocab_size": corpus.vocab_size},
            "parameters": sum(p.numel() for p in self.model.parameters()), "device": str(self.device),
            "steps": self.step, "initial": {k: first.get(k) for k in ("train", "val")},
            "final": {"step": final.get("step"), "train_loss": final.get("train"), "val_loss": final.get("val"),
                      "last_batch_loss": history["train_loss"][-1] if history["train_loss"] else None},
            "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens_seen / self.train_seconds if self.train_seconds > 0 else None,
            "skipped_steps": self.skipped_steps(), "history": history,
            "files": {"checkpoint": "ckpt.pt" if self.checkpointed is not None else None, "log": "metrics.jsonl",
                      "sample": "sample.txt" if sample_text else None, "plot": "loss.png" if plotted else None},
        }
        write_json(self.run_dir.file("metrics.json"), metrics)
        return metrics, sample_text


def _run(config: TrainConfig, corpus: CharCorpus, ckpt, ckpt_path, run_dir: RunDirectory, callback) -> dict:
    """The loop of :func:`train` for a resolved config, its loaded corpus, a locked run directory
    and the checkpoint it resumes (if any)."""
    run = _Run(config, corpus, ckpt, ckpt_path, run_dir, callback)
    model, optimizer, corpus, device = run.model, run.optimizer, run.corpus, run.device
    run.announce(ckpt, ckpt_path)
    consecutive_skips, consistent = 0, True  # consistent: no step is half done (safe to checkpoint)
    session_tokens, session_seconds = 0, 0.0  # this process only, for the progress bar's tokens/s
    batches = (corpus.batch("train", config.batch, config.context, run.data_gen, device) for _ in itertools.count())
    steps = train_steps(model, optimizer, batches, lambda t: lr_at(t, config), run.step, run.autocast_dtype, device)
    try:
        with _StopOnSigint() as sigint:
            if not run.history["eval"]:
                run.evaluate()
            model.train()
            run.progress.start(config.steps, run.step)
            while run.step < config.steps and not sigint.requested:
                consistent = False
                result = next(steps)
                consecutive_skips = consecutive_skips + 1 if result.skipped else 0
                run.record_step(result.loss, result.grad_norm, result.lr, result.seconds)
                consistent = True
                session_seconds += result.seconds
                session_tokens += config.batch * config.context
                run.progress.update(run.history["train_loss"][-1], session_tokens / max(session_seconds, 1e-9))
                if consecutive_skips >= config.max_nonfinite:
                    raise FloatingPointError(f"step {run.step}: {consecutive_skips} optimizer steps in a row skipped "
                                             "for non-finite gradients; training diverged — try a smaller --lr")
                if run.step % config.eval_every == 0 or run.step == config.steps:
                    run.evaluate()
                    run.checkpoint()
            if sigint.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise run.interrupted(consistent) from None
    except FloatingPointError:
        run.progress.close()
        run.finish("diverged")
        raise
    finally:
        run.progress.close()
        run.log.close()

    metrics, sample_text = run.finish("completed")
    run.report(metrics, sample_text)
    return metrics
