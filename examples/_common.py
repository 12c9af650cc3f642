"""Shared helpers for the example scripts: data, seeds, the training run of a study, plots, tables.

Read it like nanoGPT: ``load_corpus`` gives a character corpus, ``gpt_batches`` / ``mlp_batches``
sample training batches, ``run`` trains a model for a number of steps of the library's own loop
(``modula_mhc.loop.train_steps``) with a linearly decaying learning rate and returns its loss
history and final validation loss.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as `python examples/x.py` from a checkout without installing
    sys.path.insert(0, REPO)

from modula_mhc.data import CharCorpus, DataError, default_corpus, load_text  # noqa: E402
from modula_mhc.loop import loss_of, train_steps  # noqa: E402

#: development data set (never copied into the repository)
TINYSHAKESPEARE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))
#: the committed figures and tables of docs/; examples write here only when asked (--out docs/figures)
FIGURES = os.path.join(REPO, "docs", "figures")
#: where examples write by default: git-ignored, so running an example never changes tracked files
OUT = os.path.join(REPO, "runs", "examples")


# ------------------------------------------------------------------------------------------ data
def default_data_path():
    """tinyshakespeare when it is next to the repository, else None (the embedded corpus)."""
    return TINYSHAKESPEARE if os.path.exists(TINYSHAKESPEARE) else None


def load_corpus(path, context):
    """A CharCorpus from ``path`` (a UTF-8 text file) or, when path is None, the embedded corpus."""
    if path is None:
        return CharCorpus.from_text(default_corpus(), context, source="stdlib")
    return CharCorpus.from_text(load_text(path), context, source=os.path.basename(path))


def gpt_batches(corpus, split, batch, context, generator):
    """Endless (x, y) token batches: x = ids[i:i+T], y = ids[i+1:i+T+1]."""
    while True:
        yield corpus.batch(split, batch, context, generator)


def ngram_features(ids, positions, k, vocab_size):
    """One-hot of the k characters before each position, flattened to k·V features and scaled by
    √V so that every feature vector has unit RMS (the input scale both parametrisations assume)."""
    offsets = torch.arange(-k, 0)
    window = ids[positions[:, None] + offsets]                      # (B, k)
    x = F.one_hot(window, vocab_size).float().flatten(1)           # (B, k·V)
    return x * math.sqrt(vocab_size), ids[positions]


def mlp_batches(corpus, split, batch, k, generator):
    """Endless (x, y) batches for next-character prediction from the previous k characters."""
    ids = corpus.train if split == "train" else corpus.val
    while True:
        pos = torch.randint(k, len(ids), (batch,), generator=generator)
        yield ngram_features(ids, pos, k, corpus.vocab_size)


def fixed_batches(stream, n):
    """The first n batches of a stream, kept (a fixed validation set)."""
    return [next(stream) for _ in range(n)]


# ------------------------------------------------------------------------------------------ seeds
def set_seed(seed):
    """Seed Python, NumPy (when present) and torch; returns a torch.Generator for data sampling
    seeded differently from the initialisation so that data order and init vary independently."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # numpy is optional here
        pass
    return torch.Generator().manual_seed(10_000 + seed)


# ------------------------------------------------------------------------------------------ training
@torch.no_grad()
def evaluate(model, batches):
    """Mean cross-entropy over a list of (x, y) batches (model in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = sum(loss_of(model, x, y, None, device).item() for x, y in batches)
    model.train(was_training)
    return total / len(batches)


def run(model, optimizer, steps, train_batches, lr, val_batches=None, eval_every=None, warmup=0,
        callback=None, progress=False, desc=""):
    """Train ``steps`` optimizer steps of the library's loop (``modula_mhc.loop.train_steps``: the
    steps ``modula-mhc train`` takes) with lr(t) = lr·min(1, (t+1)/warmup)·(1 − t/steps).

    Stops early (``diverged=True``) at the first non-finite loss. ``callback(step, model,
    optimizer, record)`` runs after every step (for diagnostics). Returns a dict with
    ``losses`` (train loss per step), ``grad_norms``, ``evals`` [(step, val loss)], ``val_loss``
    (final; inf when diverged), ``diverged`` and ``seconds``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")

    def lr_of(t):
        return lr * (min(1.0, (t + 1) / warmup) if warmup else 1.0) * (1.0 - t / steps)

    record = dict(losses=[], grad_norms=[], evals=[], diverged=False)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc=desc, leave=False)
        except ImportError:
            bar = None
    t0 = time.perf_counter()
    model.train()
    for step, result in enumerate(itertools.islice(train_steps(model, optimizer, train_batches, lr_of), steps), 1):
        if not math.isfinite(result.loss):
            record["diverged"] = True
            break
        record["losses"].append(result.loss)
        record["grad_norms"].append(result.grad_norm)
        if callback is not None:
            callback(step, model, optimizer, record)
        if val_batches is not None and eval_every and step % eval_every == 0 and step < steps:
            record["evals"].append((step, evaluate(model, val_batches)))
        if bar is not None:
            bar.set_postfix(loss=f"{result.loss:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    final = math.inf
    if not record["diverged"] and val_batches is not None:
        final = evaluate(model, val_batches)
        if not math.isfinite(final):
            record["diverged"], final = True, math.inf
        record["evals"].append((steps, final))
    record["val_loss"] = final
    record["seconds"] = time.perf_counter() - t0
    return record


def smooth(values, window):
    """Trailing moving average (window clipped at the start), for plotting noisy loss curves."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ------------------------------------------------------------------------------------------ outputs
def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (None when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the figure", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path):
    """Save a small PNG (dpi 90) and close the figure."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    print(f"wrote {path}")


def write_json(path, obj):
    """Write ``obj`` as JSON; non-finite floats (diverged runs) become null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {path}")


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def markdown_table(header, rows):
    """A GitHub Markdown table from a header list and rows of cells (str() of each)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def command_line():
    """The command that is running, as a user would type it (for provenance in outputs)."""
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


# ---------------------------------------------------------------------------------- study arguments

def add_gpt_study_arguments(p, depth: int, steps: int, eval_every: int):
    """The options every GPT study shares: model size, lr, evaluation, data, output, threads."""
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=depth, help=f"number of blocks (default {depth})")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=0.1, help="DualizeRetract learning rate (default 0.1)")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--data", default=default_data_path(),
                   help="UTF-8 text file (default ../shared/data/tinyshakespeare.txt if present, else the "
                        "embedded corpus)")
    p.add_argument("--out", default=OUT, help="output folder (default runs/examples, git-ignored; "
                                             "--out docs/figures regenerates the committed figures)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")


def check_gpt_study_arguments(p, args, positive=()):
    """Reject non-positive sizes (the shared ones and ``positive``), a non-positive lr, heads that
    do not divide the width or leave an odd head width, and an unusable --data, with argparse's
    error message."""
    for name in ("width", "depth", "heads", "context", "batch", "steps", "eval_every", "val_batches", "threads",
                 *positive):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    check_heads(p, args.width, args.heads)
    check_data(p, args.data, args.context)


def check_heads(p, width, heads):
    """argparse's error unless --heads divides --width into an even head width (the rotary
    embedding of the library's GPT needs one)."""
    if width % heads:
        p.error(f"--heads ({heads}) must divide --width ({width})")
    if (width // heads) % 2:
        p.error(f"the head width --width/--heads = {width}/{heads} = {width // heads} must be even "
                f"(rotary embedding)")


def check_data(p, path, context=None):
    """argparse's error unless ``path`` (None: the embedded corpus) is a readable UTF-8 text file,
    long enough for ``context`` when given: the checks ``load_corpus`` makes, before any training."""
    if path is None:
        return
    try:
        text = load_text(path)
        if context is not None:
            CharCorpus.from_text(text, context, source=os.path.basename(path))
    except DataError as e:
        p.error(f"--data: {e}")
