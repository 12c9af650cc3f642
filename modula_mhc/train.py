"""Train a character-level GPT with the dualize-then-retract optimizer (or AdamW as a baseline).

    from modula_mhc.train import TrainConfig, train
    metrics = train(TrainConfig(preset="tiny", steps=100, quiet=True))
    metrics["final"]["val_loss"]

or from a shell: ``modula-mhc train --preset tiny`` / ``python -m modula_mhc.train --preset tiny``.

The loop reads like nanoGPT's: sample a batch, forward, cross-entropy, backward, optimizer step,
with the learning rate set every step from a schedule; every ``eval_every`` steps it estimates the
train and validation loss on ``eval_batches`` fixed batches and writes a checkpoint atomically to
``<out>/ckpt.pt``. At the end it writes ``metrics.json``, ``loss.png`` and ``sample.txt``.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import DEFAULT_CORPUS_NAME, CharCorpus, DataError, default_corpus, load_text


class ConfigError(ValueError):
    """A nonsense configuration (the message names the offending option)."""


class CheckpointError(ValueError):
    """A missing, truncated, foreign or incompatible checkpoint (the message names the file)."""


# ---------------------------------------------------------------------------------- configuration

#: model/run sizes per preset; ``tiny`` finishes in about a minute on 2 CPU cores, ``small`` is the
#: DESIGN quality setting (tinyshakespeare: old Modula and AdamW reach ~1.70 val nats/char).
PRESETS = {
    "tiny": dict(width=64, depth=2, heads=2, context=64, batch=16, steps=150, eval_every=25, eval_batches=8),
    "small": dict(width=128, depth=4, heads=4, context=64, batch=12, steps=3200, eval_every=200, eval_batches=20),
}

#: default learning rate per optimizer (measured: docs/training.md, "Choosing the learning rates")
DEFAULT_LR = {"dualize": 0.2, "adamw": 1e-2}

#: --manifolds presets → (attention manifold, MLP manifold); embeddings and head stay Euclidean
MANIFOLD_PRESETS = {
    "hetero": ("stiefel", "dgram"),
    "hetero-inv": ("dgram", "stiefel"),
    "muon": ("euclidean", "euclidean"),
    "all-stiefel": ("stiefel", "stiefel"),
    "all-dgram": ("dgram", "dgram"),
}

OPTIMIZERS = ("dualize", "adamw")
MODELS = ("gpt", "mlp")  # mlp: CharMLP, next char from the previous --ngram chars
RESIDUALS = ("plain", "hc", "mhc")
SCHEDULES = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("skip", "raise")

#: options that may change when resuming; every other option must match the checkpoint
RESUMABLE_OVERRIDES = ("steps", "eval_every", "eval_batches", "sample_chars", "out", "device", "dtype",
                       "threads", "quiet", "resume", "name")

#: defaults for options that are neither in a preset nor given (None = derived later)
BASE_DEFAULTS = dict(
    preset="tiny", model="gpt", ngram=8, data=None, residual="plain", streams=4, manifolds=None, optimizer="dualize", lr=None,
    momentum=0.95, weight_decay=0.0, schedule="linear", warmup=0, seed=0, device="auto", dtype="float32",
    threads=1,  # small models run fastest single-threaded; 2 threads on a busy 2-core machine were 10x slower
    sample_chars=500, nonfinite="skip", max_nonfinite=10,
)

CHECKPOINT_FORMAT = "modula_mhc.train.checkpoint/1"


@dataclass
class TrainConfig:
    """Everything a run needs. Fields left as None are filled, in order, from the checkpoint being
    resumed, the preset, then ``BASE_DEFAULTS`` (see :func:`resolve_config`)."""

    preset: str | None = None
    model: str | None = None            # gpt | mlp (CharMLP: an MLP on the one-hot of the last ngram chars)
    ngram: int | None = None            # chars seen by the mlp model
    data: str | None = None            # a UTF-8 text file; None: the embedded stdlib corpus
    width: int | None = None
    depth: int | None = None            # number of transformer blocks
    heads: int | None = None
    context: int | None = None
    batch: int | None = None
    steps: int | None = None            # total optimizer steps (a resumed run continues to this count)
    lr: float | None = None
    residual: str | None = None         # plain | hc | mhc
    streams: int | None = None          # residual streams for hc / mhc
    manifolds: str | None = None        # hetero | hetero-inv | muon | all-stiefel | all-dgram
    optimizer: str | None = None        # dualize | adamw
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None         # linear | cosine | constant (lr multiplier after warmup)
    warmup: int | None = None
    seed: int | None = None
    device: str | None = None           # auto | cpu | cuda
    threads: int | None = None          # CPU threads for torch (0: torch's default); see BASE_DEFAULTS
    dtype: str | None = None            # float32 | bfloat16 (autocast; weights and optimizer stay fp32)
    eval_every: int | None = None
    eval_batches: int | None = None
    sample_chars: int | None = None
    nonfinite: str | None = None        # skip | raise: what a non-finite loss or gradient does
    max_nonfinite: int | None = None    # give up after this many consecutive skipped steps
    out: str | None = None              # run directory; default runs/<name or timestamp>
    name: str | None = None
    resume: str | bool | None = None    # a checkpoint file or run directory; True: <out>/ckpt.pt or latest run
    quiet: bool = False                 # no progress bar and no printing (for sweeps)
    extra: dict = field(default_factory=dict)  # free-form notes recorded in metrics.json

    def __post_init__(self):
        _validate(self, partial=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fail(option, message):
    raise ConfigError(f"--{option.replace('_', '-')}: {message}")


def _validate(c: TrainConfig, partial: bool):
    """Range and choice checks on every field that is set; cross-field checks once all are set."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    choices = dict(preset=tuple(PRESETS), model=MODELS, residual=RESIDUALS, manifolds=tuple(MANIFOLD_PRESETS),
                   optimizer=OPTIMIZERS, schedule=SCHEDULES, device=DEVICES, dtype=DTYPES,
                   nonfinite=NONFINITE_POLICIES)
    for name, allowed in choices.items():
        v = getattr(c, name)
        if v is not None and v not in allowed:
            _fail(name, f"unknown value {v!r}; choose one of {', '.join(allowed)}")
    for name in ("width", "depth", "heads", "context", "batch", "steps", "streams", "eval_every", "eval_batches",
                 "max_nonfinite", "ngram"):
        v = getattr(c, name)
        if v is not None and (not is_int(v) or v < 1):
            _fail(name, f"must be a positive integer, got {v!r}")
    for name in ("warmup", "sample_chars", "seed", "threads"):
        v = getattr(c, name)
        if v is not None and (not is_int(v) or v < 0):
            _fail(name, f"must be a non-negative integer, got {v!r}")
    if c.seed is not None and c.seed >= 2 ** 63:
        _fail("seed", f"must be below 2**63, got {c.seed}")
    if c.lr is not None and (not isinstance(c.lr, (int, float)) or not math.isfinite(c.lr) or c.lr <= 0):
        _fail("lr", f"must be a positive finite number, got {c.lr!r}")
    if c.momentum is not None and (not isinstance(c.momentum, (int, float)) or not 0 <= c.momentum < 1):
        _fail("momentum", f"must be in [0, 1), got {c.momentum!r}")
    if c.weight_decay is not None and (not isinstance(c.weight_decay, (int, float))
                                       or not math.isfinite(c.weight_decay) or c.weight_decay < 0):
        _fail("weight_decay", f"must be a non-negative finite number, got {c.weight_decay!r}")
    if c.data is not None and (not isinstance(c.data, (str, os.PathLike)) or not os.fspath(c.data)):
        _fail("data", f"must be a file path, got {c.data!r}")
    if c.model == "mlp" and c.residual not in (None, "plain"):
        _fail("residual", f"{c.residual!r} applies to --model gpt only")
    if c.model == "mlp":
        pass  # heads do not enter the MLP
    elif c.width is not None and c.heads is not None and c.width % c.heads:
        _fail("heads", f"heads ({c.heads}) must divide width ({c.width})")
    elif c.width is not None and c.heads is not None and (c.width // c.heads) % 2:
        _fail("heads", f"the head width width/heads = {c.width // c.heads} must be even (rotary embedding)")
    if c.optimizer == "adamw" and c.manifolds not in (None, "muon"):
        _fail("manifolds", f"{c.manifolds!r} needs --optimizer dualize (AdamW does not retract onto manifolds)")
    if partial:
        return
    if c.warmup >= c.steps:
        _fail("warmup", f"must be smaller than --steps ({c.steps}), got {c.warmup}")
    if c.device == "cuda" and not torch.cuda.is_available():
        _fail("device", "cuda was asked for but torch.cuda.is_available() is False")


def resolve_config(config: TrainConfig, checkpoint_config: dict | None = None) -> TrainConfig:
    """A copy with every field set: given fields win, then the checkpoint's, then the preset's,
    then ``BASE_DEFAULTS``; lr and manifolds default per optimizer. When resuming, fields outside
    ``RESUMABLE_OVERRIDES`` must agree with the checkpoint."""
    given = {k: v for k, v in config.to_dict().items() if v is not None}
    merged = {}
    if checkpoint_config is not None:
        for k, v in given.items():
            old = checkpoint_config.get(k)
            if k not in RESUMABLE_OVERRIDES and k not in ("quiet", "extra") and old is not None and v != old:
                _fail(k, f"the checkpoint was trained with {old!r}, cannot resume with {v!r}")
        merged.update({k: v for k, v in checkpoint_config.items() if k in given or v is not None})
        merged.pop("resume", None)
    merged.update(given)
    preset = merged.get("preset") or BASE_DEFAULTS["preset"]
    for k, v in {**BASE_DEFAULTS, **PRESETS[preset]}.items():
        if merged.get(k) is None:
            merged[k] = v
    if merged["lr"] is None:
        merged["lr"] = DEFAULT_LR[merged["optimizer"]]
    if merged["manifolds"] is None:
        merged["manifolds"] = "hetero" if merged["optimizer"] == "dualize" else "muon"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    resolved = TrainConfig(**{k: v for k, v in merged.items() if k in known})
    _validate(resolved, partial=False)
    return resolved


# ---------------------------------------------------------------------------------- checkpoints

def atomic_write(path, write) -> None:
    """Write a file so that readers see the old or the new content, never a torn one:
    ``write(f)`` fills a temporary file in the same directory, which is fsynced and then
    ``os.replace``-d onto ``path`` (atomic on POSIX and Windows); the directory is fsynced too."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # persist the rename itself (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    # temporaries of earlier writers that were killed mid-write (one writer per run directory)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(os.path.basename(path))}.*.tmp")):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


def rng_state() -> dict:
    """The global RNG states a run depends on (torch CPU, CUDA if present, Python's random)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, payload: dict) -> None:
    """Atomically write a checkpoint dict (tagged with ``CHECKPOINT_FORMAT``)."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing, truncated or foreign file
    raises :class:`CheckpointError` naming the file (never a stack trace from inside torch)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path!r} is unreadable (truncated or not a torch file): "
                              f"{reason[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a modula_mhc training checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r}, found {found!r})")
    missing = [k for k in ("config", "vocab", "step", "model", "optimizer", "rng", "history") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {', '.join(missing)}")
    return payload


def find_checkpoint(resume, out) -> str:
    """The checkpoint file that ``resume`` names: a file, a run directory, or (True) ``<out>/ckpt.pt``,
    else the most recently written ``runs/*/ckpt.pt``."""
    if resume is True:
        if out is not None:
            return os.path.join(out, "ckpt.pt")
        candidates = []
        if os.path.isdir("runs"):
            for d in os.listdir("runs"):
                p = os.path.join("runs", d, "ckpt.pt")
                if os.path.isfile(p):
                    candidates.append((os.path.getmtime(p), p))
        if not candidates:
            raise CheckpointError("--resume without a path found no runs/*/ckpt.pt; give the checkpoint path")
        return max(candidates)[1]
    resume = os.fspath(resume)
    return os.path.join(resume, "ckpt.pt") if os.path.isdir(resume) else resume


# ---------------------------------------------------------------------------------- model and optimizer

def build_model(config: TrainConfig, vocab_size: int):
    """The GPT (or CharMLP) of the config, weights initialised from the global torch RNG (seeded by
    the caller)."""
    from .compounds import GPT, CharMLP
    attn, mlp = MANIFOLD_PRESETS[config.manifolds]
    if config.model == "mlp":  # depth = number of Linear atoms; the MLP preset manifold applies
        return CharMLP(vocab_size, config.width, config.depth, ngram=config.ngram, manifold=mlp)
    kwargs = {} if config.residual == "plain" else {"streams": config.streams}
    try:
        return GPT(vocab_size, config.context, config.width, config.depth, config.heads, residual=config.residual,
                   attn_manifold=attn, mlp_manifold=mlp, **kwargs)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--residual {config.residual}: not available in this build ({e})") from None
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_optimizer(config: TrainConfig, model):
    """DualizeRetract over the module tree (per-atom step sizes from the modular norm), or AdamW."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                 weight_decay=config.weight_decay)
    from . import optim
    if not hasattr(optim, "DualizeRetract"):
        raise ConfigError("--optimizer dualize: modula_mhc.optim.DualizeRetract is not available in this build")
    return optim.DualizeRetract(model, lr=config.lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)


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


# ---------------------------------------------------------------------------------- evaluation and sampling

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


# ---------------------------------------------------------------------------------- outputs

def plot_losses(path, history: dict, title: str) -> bool:
    """Train (per step, with a running mean) and val (per eval) loss curves to a PNG; False when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    steps, losses = history["step"], history["train_loss"]
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (batch)")
        window = max(1, len(losses) // 40)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label=f"train (mean of {window})")
    ev = history["eval"]
    if ev:
        ax.plot([e["step"] for e in ev], [e["val"] for e in ev], "o-", color="tab:orange", lw=1.5, ms=3,
                label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return True


def _json_safe(obj):
    """NaN/Inf (a skipped step's loss) become null, so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(_json_safe(obj), indent=2, allow_nan=False).encode()))


class _Progress:
    """tqdm when available and wanted, else silent (quiet) or plain prints."""

    def __init__(self, quiet):
        self.quiet, self.bar = quiet, None

    def start(self, total, initial):
        if self.quiet:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", unit="step")

    def update(self, loss, tok_s):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)

    def write(self, msg):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------- the loop

def _load_corpus(config: TrainConfig, vocab: str | None = None) -> CharCorpus:
    if config.data is None:
        return CharCorpus.from_text(default_corpus(), config.context, source=DEFAULT_CORPUS_NAME, vocab=vocab)
    return CharCorpus.from_text(load_text(config.data), config.context, source=os.fspath(config.data), vocab=vocab)


def _default_out(config: TrainConfig) -> str:
    return os.path.join("runs", config.name or time.strftime("%Y%m%d-%H%M%S"))


def train(config: TrainConfig | None = None, callback=None) -> dict:
    """Run (or resume) training and return the metrics dict that is also written to metrics.json.

    ``callback(info)``, if given, is called after every evaluation with a dict holding ``step``,
    ``train_loss``, ``val_loss``, ``model``, ``optimizer`` and ``config`` (for diagnostics such as
    singular values over training). Raises ConfigError / DataError / CheckpointError on bad input."""
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")

    # -- resolve the config (from a checkpoint when resuming) and the run directory
    ckpt = ckpt_path = None
    if config.resume:
        ckpt_path = find_checkpoint(config.resume, config.out)
        ckpt = load_checkpoint(ckpt_path)
        out = config.out or os.path.dirname(os.path.abspath(ckpt_path))  # the run may have been moved
        config = dataclasses.replace(resolve_config(config, ckpt["config"]), out=out)
    else:
        config = resolve_config(config)
        if config.out is None:
            config = dataclasses.replace(config, out=_default_out(config))
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        _fail("out", f"{config.out!r} exists and is not a directory")
    previous_threads = torch.get_num_threads()
    if config.threads and resolve_device(config.device).type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        return _run(config, ckpt, ckpt_path, callback)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: TrainConfig, ckpt: dict | None, ckpt_path: str | None, callback) -> dict:
    """The loop of :func:`train` for a resolved config (and the checkpoint it resumes, if any)."""
    out = config.out
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
    step, tokens_seen, train_seconds, skipped = 0, 0, 0.0, 0
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
        step, tokens_seen = ckpt["step"], ckpt.get("tokens_seen", 0)
        train_seconds, skipped = ckpt.get("train_seconds", 0.0), ckpt.get("skipped_steps", 0)
    os.makedirs(out, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = config.batch * config.context

    def checkpoint():
        save_checkpoint(os.path.join(out, "ckpt.pt"), {
            "config": config.to_dict(), "vocab": corpus.vocab, "step": step, "tokens_seen": tokens_seen,
            "train_seconds": train_seconds, "skipped_steps": skipped,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": {**rng_state(), "data": data_gen.get_state()}, "history": history,
        })

    def evaluate():
        losses = estimate_loss(model, corpus, config, device, autocast_dtype)
        history["eval"].append({"step": step, "train": losses["train"], "val": losses["val"]})
        progress.write(f"step {step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if callback is not None:
            callback({"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "model": model,
                      "optimizer": optimizer, "config": config})
        return losses

    progress = _Progress(config.quiet)
    if not config.quiet:
        where = f"resumed from {ckpt_path} at step {step}" if ckpt else "new run"
        progress.write(f"modula-mhc train: {where}; {n_params:,} parameters, vocab {corpus.vocab_size} "
                       f"({corpus.source}, {len(corpus.train) + len(corpus.val):,} chars), device {device}, "
                       f"out {out}")
    if not history["eval"]:
        evaluate()
    model.train()
    consecutive_bad = 0
    session_tokens, session_seconds = 0, 0.0  # this process only, for the progress bar's tokens/s
    progress.start(config.steps, step)
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = corpus.batch("train", config.batch, config.context, data_gen, device)
            loss = loss_of(model, x, y, autocast_dtype, device)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            loss_value, grad_norm_value = loss.item(), grad_norm.item()
            if math.isfinite(loss_value) and math.isfinite(grad_norm_value):
                optimizer.step()
                consecutive_bad = 0
            else:  # never let a NaN/Inf reach the weights: skip the step and count it
                skipped += 1
                consecutive_bad += 1
                msg = f"step {step}: non-finite loss {loss_value} / gradient norm {grad_norm_value}"
                if config.nonfinite == "raise" or consecutive_bad >= config.max_nonfinite:
                    raise FloatingPointError(f"{msg} ({consecutive_bad} in a row); training diverged — "
                                             f"try a smaller --lr")
                warnings.warn(f"{msg}; step skipped ({skipped} so far)", RuntimeWarning, stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_seconds += dt
            tokens_seen += tokens_per_step
            session_seconds += dt
            session_tokens += tokens_per_step
            step += 1
            history["step"].append(step)
            history["train_loss"].append(loss_value)
            history["grad_norm"].append(grad_norm_value)
            history["lr"].append(lr)
            progress.update(loss_value, session_tokens / session_seconds if session_seconds > 0 else float("nan"))
            if step % config.eval_every == 0 or step == config.steps:
                evaluate()
                checkpoint()
    finally:
        progress.close()

    # -- outputs: sample, plot, metrics
    final = history["eval"][-1]
    sample_text = ""
    if config.sample_chars:
        prompt_char = "\n" if "\n" in corpus.vocab else corpus.vocab[0]
        gen = torch.Generator().manual_seed(config.seed)
        ids = generate(model, corpus.encode(prompt_char).to(device), config.sample_chars, config.context, gen)
        sample_text = corpus.decode(ids.tolist())
        atomic_write(os.path.join(out, "sample.txt"), lambda f: f.write(sample_text.encode()))
    title = (f"{config.optimizer} lr={config.lr:g} {config.manifolds} | w{config.width} d{config.depth} "
             f"h{config.heads} T{config.context} B{config.batch} | {corpus.source}")
    plotted = plot_losses(os.path.join(out, "loss.png"), history, title)
    metrics = {
        "config": config.to_dict(),
        "data": {"source": corpus.source, "chars": len(corpus.train) + len(corpus.val),
                 "vocab_size": corpus.vocab_size},
        "parameters": n_params,
        "device": str(device),
        "steps": step,
        "initial": {k: history["eval"][0][k] for k in ("train", "val")},
        "final": {"train_loss": final["train"], "val_loss": final["val"],
                  "last_batch_loss": history["train_loss"][-1] if history["train_loss"] else None},
        "tokens_seen": tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 else None,
        "skipped_steps": skipped,
        "history": history,
        "files": {"checkpoint": "ckpt.pt", "sample": "sample.txt" if config.sample_chars else None,
                  "plot": "loss.png" if plotted else None},
    }
    _write_json(os.path.join(out, "metrics.json"), metrics)
    if not config.quiet:
        if sample_text:
            print(f"\n--- sample ({config.sample_chars} chars) ---\n{sample_text}\n---", flush=True)
        rate = metrics["tokens_per_s"]
        print(f"final: train loss {final['train']:.4f}, val loss {final['val']:.4f}, "
              f"{rate:,.0f} tokens/s; outputs in {out}/" if rate else f"outputs in {out}/", flush=True)
    return metrics


if __name__ == "__main__":
    from .cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
