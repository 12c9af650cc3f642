"""The ``modula-mhc`` command line: ``train`` and ``sample`` (alias ``generate``); ``--help`` on each.

The parser only converts text to numbers; every check lives in :mod:`modula_mhc.config` (and in
:func:`modula_mhc.train.sample`). Any error — bad flags, bad data, an unusable checkpoint or run
directory, a failed write, a diverged run — is one ``modula-mhc <command>: error: ...`` line on
stderr and exit status 2; Ctrl-C writes what was done and exits with 130.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings

import torch

from . import __version__
from .checkpoint import CheckpointError
from .config import (
    BASE_DEFAULTS,
    DEFAULT_LR,
    DEVICES,
    DTYPES,
    MANIFOLD_PRESETS,
    MODELS,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    PRESETS,
    RESIDUALS,
    SCHEDULES,
    ConfigError,
    TrainConfig,
    resolve_device,
)
from .cpu_memory import retain_freed_memory
from .data import DataError
from .optim.default_lr import REFERENCE_LR, REFERENCE_STEPS, lr_for_steps
from .train import sample, train

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _choices(values) -> str:
    return "|".join(values)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` flags. Every default is None: unset flags come from the checkpoint being resumed,
    then the preset, then the defaults in :mod:`modula_mhc.config` (shown in brackets)."""
    def preset_default(key):
        return ", ".join(f"{name} {values[key]}" for name, values in PRESETS.items())

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="UTF-8 text file to train on [the embedded corpus: this Python's standard-library source]")
    g = p.add_argument_group("model and run size (--preset fills the rest)")
    g.add_argument("--preset", metavar=_choices(PRESETS), help=f"size preset [{BASE_DEFAULTS['preset']}]")
    g.add_argument("--model", metavar=_choices(MODELS), help="gpt, or mlp: an MLP on the one-hot of the last "
                                                             "--ngram chars [gpt]")
    g.add_argument("--ngram", type=int, help="chars seen by --model mlp [8]")
    g.add_argument("--width", type=int, help=f"model width [{preset_default('width')}]")
    g.add_argument("--depth", type=int, help=f"transformer blocks [{preset_default('depth')}]")
    g.add_argument("--heads", type=int, help=f"attention heads [{preset_default('heads')}]")
    g.add_argument("--context", type=int, help=f"context length in chars [{preset_default('context')}]")
    g.add_argument("--batch", type=int, help=f"sequences per step [{preset_default('batch')}]")
    g.add_argument("--steps", type=int, help=f"optimizer steps in total [{preset_default('steps')}]")
    g.add_argument("--residual", metavar=_choices(RESIDUALS), help="residual connection: plain, hyper-connections, "
                                                                    "manifold-constrained hyper-connections [plain]")
    g.add_argument("--streams", type=int, help="residual streams for hc/mhc [4]")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", metavar=_choices(OPTIMIZERS), help="dualize-then-retract, or AdamW as a "
                                                                      "baseline [dualize]")
    g.add_argument("--manifolds", metavar=_choices(MANIFOLD_PRESETS),
                   help="weight manifolds: muon = unconstrained (fastest); hetero = Stiefel attention + DGram MLP "
                        "(certified dual solves: ~10x AdamW per step on a CPU, ~37x Muon on an H100) [muon]")
    g.add_argument("--lr", type=float,
                   help=f"peak learning rate [dualize {REFERENCE_LR:g}·min(1, √({REFERENCE_STEPS}/steps)): "
                        f"tiny {lr_for_steps(PRESETS['tiny']['steps']):.3g}, small {lr_for_steps(PRESETS['small']['steps']):.3g}; "
                        f"adamw {DEFAULT_LR['adamw']:g}]")
    g.add_argument("--momentum", type=float, help=f"momentum (dualize) [{BASE_DEFAULTS['momentum']}]")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay [0]")
    g.add_argument("--schedule", metavar=_choices(SCHEDULES), help=f"lr decay after warmup "
                                                                   f"[{BASE_DEFAULTS['schedule']}]")
    g.add_argument("--warmup", type=int, help="linear warmup steps [0]")
    g.add_argument("--nonfinite", metavar=_choices(NONFINITE_POLICIES),
                   help="DualizeRetract on a NaN/Inf gradient: skip the step (and warn) or stop [skip]")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help="seed of initialisation and batches [0]")
    g.add_argument("--device", metavar=_choices(DEVICES), help="[auto: cuda if available]")
    g.add_argument("--threads", type=int,
                   help="CPU threads for torch; 0 = torch's default (all cores) [1: fastest for small models]")
    g.add_argument("--dtype", metavar=_choices(DTYPES), help="bfloat16 = autocast forward, fp32 weights [float32]")
    g.add_argument("--eval-every", type=int, help=f"steps between evaluations and checkpoints "
                                                  f"[{preset_default('eval_every')}]")
    g.add_argument("--eval-batches", type=int, help=f"batches per loss estimate [{preset_default('eval_batches')}]")
    g.add_argument("--sample-chars", type=int, help="length of the text sample at the end [500]")
    g.add_argument("--out", metavar="DIR", help="run directory [runs/<name or timestamp>]")
    g.add_argument("--name", help="run name for the default run directory")
    g.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue from a checkpoint file or run directory; without PATH: <out>/ckpt.pt "
                        "(--out, or runs/<name> with --name), else the newest runs/*/ckpt.pt")
    g.add_argument("--force", action="store_true", help="replace the outputs of an earlier run in the run directory")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no printing")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="RUN", help="a run directory or checkpoint file")
    p.add_argument("--chars", type=int, default=500, help="characters to generate [500]")
    p.add_argument("--prompt", default=None, help="text to continue [a newline]")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature [1.0]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    p.add_argument("--device", default="auto", metavar=_choices(DEVICES), help="[auto]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modula-mhc", description="modula_mhc command line")
    parser.add_argument("--version", action="version", version=f"modula-mhc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add_train_arguments(sub.add_parser("train", help="train a character-level GPT",
                                       description="Train a character-level GPT with the dualize-then-retract "
                                                   "optimizer."))
    for name in ("sample", "generate"):
        add_sample_arguments(sub.add_parser(name, help="sample text from a trained checkpoint" if name == "sample"
                                            else "the same as sample",
                                            description="Print text sampled from the model of a checkpoint."))
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``train`` arguments (unset flags stay None); it validates them."""
    keys = [f for f in TrainConfig.__dataclass_fields__ if f not in ("extra", "max_nonfinite")]
    return TrainConfig(**{k: getattr(args, k) for k in keys if hasattr(args, k)})


def _one_line(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return f"--{e.option.replace('_', '-')}: {e.reason}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Entry point of ``modula-mhc``; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    prog = f"modula-mhc {args.command}"
    with warnings.catch_warnings(), _escaping_output():  # a warning (e.g. a skipped step) is one line too
        warnings.showwarning = lambda message, *_: print(f"{prog}: warning: {' '.join(str(message).split())}",
                                                         file=sys.stderr)
        return _run_command(args, prog)


@contextlib.contextmanager
def _escaping_output():
    """stdout and stderr escape what their encoding cannot show (``errors="backslashreplace"``): a
    UTF-8 corpus's sample or file name on an ASCII terminal (LC_ALL=C) is printed, not a traceback
    after the run."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)  # the C locale's is surrogateescape, which fails on "é" too
        if errors in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
                changed.append((stream, errors))
            except (ValueError, OSError, io.UnsupportedOperation):
                pass
    try:
        yield
    finally:
        for stream, errors in changed:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError, io.UnsupportedOperation):
                pass


def _out_of_memory(e: BaseException) -> bool:
    """torch's allocation failures (CPU: a RuntimeError "can't allocate memory"; CUDA: OutOfMemoryError)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def _run_command(args, prog) -> int:
    try:
        if args.command == "train":
            config = config_from_args(args)
            device = config.device or "auto"
            if device in ("auto", "cpu") and resolve_device(device).type == "cpu":
                retain_freed_memory()  # no page faults on re-allocated activations (cpu_memory.py)
            train(config)
        else:
            text = sample(args.checkpoint, chars=args.chars, prompt=args.prompt,
                                   temperature=args.temperature, seed=args.seed, device=args.device)
            sys.stdout.write(text + "\n")
    except KeyboardInterrupt as e:
        print(f"{prog}: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DataError, CheckpointError, FloatingPointError, OSError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(f"{prog}: error: out of memory ({_one_line(e)[:160]}); try a smaller --batch, --width, --depth "
              "or --context", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
