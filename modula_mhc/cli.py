"""The ``modula-mhc`` command line. ``modula-mhc train --help`` lists the training flags.

Bad input (a missing/empty/binary data file, nonsense flags, an unusable checkpoint) prints one
``modula-mhc <command>: error: ...`` line and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonnegative_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {v}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def _nonnegative_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text}")
    return v


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` flags. Every default is None: unset flags come from the checkpoint being resumed,
    then the preset, then the defaults in :mod:`modula_mhc.train` (shown in brackets)."""
    from .train import (BASE_DEFAULTS, DEFAULT_LR, DEVICES, DTYPES, MANIFOLD_PRESETS, NONFINITE_POLICIES,
                        MODELS, OPTIMIZERS, PRESETS, RESIDUALS, SCHEDULES)

    def preset_default(key):
        return ", ".join(f"{name} {values[key]}" for name, values in PRESETS.items())

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="UTF-8 text file to train on [the embedded corpus: this Python's standard-library source]")
    g = p.add_argument_group("model and run size (--preset fills the rest)")
    g.add_argument("--preset", choices=tuple(PRESETS), help=f"size preset [{BASE_DEFAULTS['preset']}]")
    g.add_argument("--model", choices=MODELS, help="gpt, or mlp: an MLP on the one-hot of the last --ngram chars [gpt]")
    g.add_argument("--ngram", type=_positive_int, help="chars seen by --model mlp [8]")
    g.add_argument("--width", type=_positive_int, help=f"model width [{preset_default('width')}]")
    g.add_argument("--depth", type=_positive_int, help=f"transformer blocks [{preset_default('depth')}]")
    g.add_argument("--heads", type=_positive_int, help=f"attention heads [{preset_default('heads')}]")
    g.add_argument("--context", type=_positive_int, help=f"context length in chars [{preset_default('context')}]")
    g.add_argument("--batch", type=_positive_int, help=f"sequences per step [{preset_default('batch')}]")
    g.add_argument("--steps", type=_positive_int, help=f"optimizer steps in total [{preset_default('steps')}]")
    g.add_argument("--residual", choices=RESIDUALS, help="residual connection: plain, hyper-connections, "
                                                         "manifold-constrained hyper-connections [plain]")
    g.add_argument("--streams", type=_positive_int, help="residual streams for hc/mhc [4]")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="dualize-then-retract, or AdamW as a baseline [dualize]")
    g.add_argument("--manifolds", choices=tuple(MANIFOLD_PRESETS),
                   help="weight manifolds: hetero = Stiefel attention + DGram MLP; muon = unconstrained [hetero]")
    g.add_argument("--lr", type=_positive_float,
                   help="peak learning rate [" + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "]")
    g.add_argument("--momentum", type=_nonnegative_float, help=f"momentum (dualize) [{BASE_DEFAULTS['momentum']}]")
    g.add_argument("--weight-decay", type=_nonnegative_float, help="decoupled weight decay [0]")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"lr decay after warmup [{BASE_DEFAULTS['schedule']}]")
    g.add_argument("--warmup", type=_nonnegative_int, help="linear warmup steps [0]")
    g.add_argument("--nonfinite", choices=NONFINITE_POLICIES,
                   help="on a non-finite loss or gradient: skip the step (and warn) or stop [skip]")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=_nonnegative_int, help="seed of initialisation and batches [0]")
    g.add_argument("--device", choices=DEVICES, help="[auto: cuda if available]")
    g.add_argument("--threads", type=_nonnegative_int,
                   help="CPU threads for torch; 0 = torch's default (all cores) [1: fastest for small models]")
    g.add_argument("--dtype", choices=DTYPES, help="bfloat16 = autocast forward, fp32 weights [float32]")
    g.add_argument("--eval-every", type=_positive_int, help=f"steps between evaluations and checkpoints "
                                                            f"[{preset_default('eval_every')}]")
    g.add_argument("--eval-batches", type=_positive_int, help=f"batches per loss estimate "
                                                              f"[{preset_default('eval_batches')}]")
    g.add_argument("--sample-chars", type=_nonnegative_int, help="length of the text sample at the end [500]")
    g.add_argument("--out", metavar="DIR", help="run directory [runs/<name or timestamp>]")
    g.add_argument("--name", help="run name for the default run directory")
    g.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue from a checkpoint file or run directory; without PATH: <out>/ckpt.pt, "
                        "else the newest runs/*/ckpt.pt")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no printing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modula-mhc", description="modula_mhc command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train_parser = sub.add_parser("train", help="train a character-level GPT",
                                  description="Train a character-level GPT with the dualize-then-retract optimizer.")
    add_train_arguments(train_parser)
    return parser


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of parsed ``train`` arguments (unset flags stay None)."""
    from .train import TrainConfig
    keys = [f for f in TrainConfig.__dataclass_fields__ if f not in ("extra", "quiet", "max_nonfinite")]
    return TrainConfig(**{k: getattr(args, k) for k in keys if hasattr(args, k)}, quiet=args.quiet)


def main(argv=None) -> int:
    """Entry point of ``modula-mhc``; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from .data import DataError
        from .train import CheckpointError, ConfigError, train
        prog = "modula-mhc train"
        try:
            train(config_from_args(args))
        except (ConfigError, DataError, CheckpointError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted; the last checkpoint (if any) is in the run directory", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
