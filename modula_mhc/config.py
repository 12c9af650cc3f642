"""The training configuration: presets, defaults, the one place where options are validated, and
the model and device a configuration describes (:func:`build_model`, :func:`resolve_device`).

``TrainConfig(...)`` checks every field it is given (ranges, choices, cross-field rules) when it is
built; :func:`resolve_config` fills the unset fields (checkpoint, then preset, then defaults) and
checks the rules that need every field. The command line passes its flags through unchanged, so
an error names the field (``steps: must be a positive integer``) and the CLI prints it as a flag.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from .compounds import GPT, CharMLP
from .optim.default_lr import REFERENCE_LR, lr_for_steps
from .optim.presets import PRESETS as MANIFOLD_PRESETS


class ConfigError(ValueError):
    """A nonsense configuration. ``option`` is the field (``weight_decay``), ``reason`` the rest."""

    def __init__(self, option: str, reason: str):
        self.option, self.reason = option, reason
        super().__init__(f"{option}: {reason}")


#: model/run sizes per preset; ``tiny`` finishes in about a minute on 2 CPU cores, ``small`` is the
#: DESIGN quality setting (tinyshakespeare: old Modula and AdamW reach ~1.70 val nats/char).
PRESETS = {
    "tiny": dict(width=64, depth=2, heads=2, context=64, batch=16, steps=150, eval_every=25, eval_batches=8),
    "small": dict(width=128, depth=4, heads=4, context=64, batch=12, steps=3200, eval_every=200, eval_batches=20),
}

#: default learning rate per optimizer (measured: docs/training.md, "Choosing the learning rates");
#: the dualize rate is this for runs up to 150 steps and falls like 1/√steps after (``lr_for_steps``)
DEFAULT_LR = {"dualize": REFERENCE_LR, "adamw": 1e-2}

OPTIMIZERS = ("dualize", "adamw")
MODELS = ("gpt", "mlp")  # mlp: CharMLP, next char from the previous --ngram chars
RESIDUALS = ("plain", "hc", "mhc")
SCHEDULES = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
#: DualizeRetract's policies a run may choose ("ignore" would let NaN reach the weights)
NONFINITE_POLICIES = ("skip", "raise")

#: options that may change when resuming; every other option must match the checkpoint
RESUMABLE_OVERRIDES = ("steps", "eval_every", "eval_batches", "sample_chars", "out", "device", "dtype",
                       "threads", "quiet", "resume", "name", "force")

#: what an unset option of a checkpoint meant, for the resume error
_UNSET = {"data": "the embedded corpus (no --data)", "nonfinite": "no --nonfinite policy (AdamW)"}

#: defaults for options that are neither in a preset nor given (None = derived in resolve_config)
BASE_DEFAULTS = dict(
    preset="tiny", model="gpt", ngram=8, data=None, residual="plain", streams=4, manifolds=None, optimizer="dualize",
    lr=None, momentum=0.95, weight_decay=0.0, schedule="linear", warmup=0, seed=0, device="auto", dtype="float32",
    threads=1,  # small models run fastest single-threaded (more threads contend on a shared machine)
    sample_chars=500, nonfinite=None, max_nonfinite=10,
)

_CHOICES = dict(preset=tuple(PRESETS), model=MODELS, residual=RESIDUALS, manifolds=tuple(MANIFOLD_PRESETS),
                optimizer=OPTIMIZERS, schedule=SCHEDULES, device=DEVICES, dtype=DTYPES, nonfinite=NONFINITE_POLICIES)
_POSITIVE = ("width", "depth", "heads", "context", "batch", "steps", "streams", "eval_every", "eval_batches",
             "max_nonfinite", "ngram")
_NONNEGATIVE = ("warmup", "sample_chars", "seed", "threads")
#: the largest --lr: far above any useful rate, far below float32's 3.4e38, so the step sizes the
#: optimizers derive from it (AdamW's lr / (1 - 0.9) at step 1) still fit the fp32 weights
MAX_LR = 1e6


@dataclass
class TrainConfig:
    """Everything a run needs. Fields left as None are filled, in order, from the checkpoint being
    resumed, the preset, then ``BASE_DEFAULTS`` (see :func:`resolve_config`)."""

    preset: str | None = None
    model: str | None = None            # gpt | mlp (CharMLP: an MLP on the one-hot of the last ngram chars)
    ngram: int | None = None            # chars seen by the mlp model
    data: str | None = None             # a UTF-8 text file; None: the embedded stdlib corpus
    width: int | None = None
    depth: int | None = None            # number of transformer blocks
    heads: int | None = None
    context: int | None = None
    batch: int | None = None
    steps: int | None = None            # total optimizer steps (a resumed run continues to this count)
    lr: float | None = None
    residual: str | None = None         # plain | hc | mhc
    streams: int | None = None          # residual streams for hc / mhc
    manifolds: str | None = None        # a preset of modula_mhc.optim.presets (hetero, muon, ...)
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
    nonfinite: str | None = None        # skip | raise: DualizeRetract's policy for NaN/Inf gradients
    max_nonfinite: int | None = None    # give up after this many consecutive skipped steps
    out: str | None = None              # run directory; default runs/<name or timestamp>
    name: str | None = None
    resume: str | bool | None = None    # a checkpoint file or run directory; True: <out>/ckpt.pt or latest run
    force: bool = False                 # replace the outputs of an earlier run in ``out``
    quiet: bool = False                 # no progress bar and no printing (for sweeps)
    extra: dict = field(default_factory=dict)  # free-form notes recorded in metrics.json

    def __post_init__(self):
        _validate(self, partial=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and bool(os.fspath(v))


#: field → (test of a set value, what it must be); the message is "<field>: <what>, got <value>"
_FIELD_RULES = {
    **{n: (lambda v, a=allowed: v in a, f"must be one of {', '.join(allowed)}") for n, allowed in _CHOICES.items()},
    **{n: (lambda v: _is_int(v) and v >= 1, "must be a positive integer") for n in _POSITIVE},
    **{n: (lambda v: _is_int(v) and v >= 0, "must be a non-negative integer") for n in _NONNEGATIVE},
    "seed": (lambda v: _is_int(v) and 0 <= v < 2 ** 63, "must be a non-negative integer below 2**63"),
    "lr": (lambda v: _is_number(v) and 0 < v <= MAX_LR, f"must be a positive number at most {MAX_LR:g}"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "must be a non-negative finite number"),
    "data": (_is_path, "must be a non-empty path"),
    "out": (_is_path, "must be a non-empty path"),
    "name": (lambda v: isinstance(v, str) and bool(v) and os.sep not in v and v not in (".", ".."),
             f"must be a non-empty name without {os.sep!r}"),
    "resume": (lambda v: isinstance(v, bool) or _is_path(v),
               "must be a checkpoint file or run directory (without a value: <out>/ckpt.pt or the newest run)"),
}


def _rule_errors(c: TrainConfig):
    """(option, reason) of the rules that tie fields together, as far as the set fields allow."""
    if c.force and c.resume:
        yield "force", "replaces an earlier run and --resume continues it; give one of them"
    if c.model == "mlp" and c.residual not in (None, "plain"):
        yield "residual", f"{c.residual!r} applies to --model gpt only"
    if c.model != "mlp" and c.width is not None and c.heads is not None:
        if c.width % c.heads:
            yield "heads", f"heads ({c.heads}) must divide width ({c.width})"
        elif (c.width // c.heads) % 2:
            yield "heads", f"the head width width/heads = {c.width // c.heads} must be even (rotary embedding)"
    if c.optimizer == "adamw" and c.manifolds not in (None, "muon"):
        yield "manifolds", f"{c.manifolds!r} needs --optimizer dualize (AdamW does not retract onto manifolds)"
    if c.optimizer == "adamw" and c.nonfinite is not None:
        yield "nonfinite", "is DualizeRetract's policy; the AdamW baseline has none (docs/training.md)"
    if c.warmup is not None and c.steps is not None and c.warmup >= c.steps:
        yield "warmup", f"must be smaller than --steps ({c.steps}), got {c.warmup}"


def _validate(c: TrainConfig, partial: bool) -> None:
    """Every set field against ``_FIELD_RULES``, then the rules between fields; CUDA once resolved."""
    for name, (ok, what) in _FIELD_RULES.items():
        v = getattr(c, name)
        if v is not None and not ok(v):
            raise ConfigError(name, f"{what}, got {v!r}")
    for option, reason in _rule_errors(c):
        raise ConfigError(option, reason)
    if not partial and c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but torch.cuda.is_available() is False")


def resolve_config(config: TrainConfig, checkpoint_config: dict | None = None) -> TrainConfig:
    """A copy with every field set: given fields win, then the checkpoint's, then the preset's,
    then ``BASE_DEFAULTS``; lr, manifolds and nonfinite default per optimizer. When resuming,
    fields outside ``RESUMABLE_OVERRIDES`` must agree with the checkpoint."""
    given = {k: v for k, v in config.to_dict().items() if v is not None}
    merged = {}
    if checkpoint_config is not None:
        for k, v in given.items():
            # a field the checkpoint left unset (data: the embedded corpus) must stay unset; only a
            # key an older checkpoint lacks is not compared
            if k in RESUMABLE_OVERRIDES or k == "extra" or k not in checkpoint_config:
                continue
            old = checkpoint_config[k]
            if v != old:
                was = repr(old) if old is not None else _UNSET.get(k, "it unset")
                raise ConfigError(k, f"the checkpoint was trained with {was}, cannot resume with {v!r}")
        merged.update({k: v for k, v in checkpoint_config.items() if k in given or v is not None})
        for k in ("resume", "force"):
            merged.pop(k, None)
    merged.update(given)
    preset = merged.get("preset") or BASE_DEFAULTS["preset"]
    for k, v in {**BASE_DEFAULTS, **PRESETS[preset]}.items():
        if merged.get(k) is None:
            merged[k] = v
    if merged["lr"] is None:
        merged["lr"] = DEFAULT_LR[merged["optimizer"]]
        if merged["optimizer"] == "dualize":  # transfers across width and depth, not run length
            try:
                merged["lr"] = lr_for_steps(merged["steps"])
            except ValueError:
                pass  # a bad --steps is reported by the validation below
    if merged["manifolds"] is None:
        # Muon by default: at this scale it trains best and fastest (docs/results.md, section 6);
        # Hetero's certified DGram solve costs far more per step on a CPU (same section's table)
        merged["manifolds"] = "muon"
    if merged["nonfinite"] is None and merged["optimizer"] == "dualize":
        merged["nonfinite"] = "skip"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    resolved = TrainConfig(**{k: v for k, v in merged.items() if k in known})
    _validate(resolved, partial=False)
    return resolved


# ---------------------------------------------------------------------------------- what a config builds

def build_model(config: TrainConfig, vocab_size: int):
    """The GPT (or CharMLP) of the config, weights initialised from the global torch RNG (seeded by
    the caller)."""
    attn, mlp = MANIFOLD_PRESETS[config.manifolds][:2]
    if config.model == "mlp":  # depth = number of Linear atoms; the MLP preset manifold applies
        return CharMLP(vocab_size, config.width, config.depth, ngram=config.ngram, manifold=mlp)
    kwargs = {} if config.residual == "plain" else {"streams": config.streams}
    return GPT(vocab_size, config.context, config.width, config.depth, config.heads, residual=config.residual,
               attn_manifold=attn, mlp_manifold=mlp, **kwargs)



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
