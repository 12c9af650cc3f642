"""What a training run writes besides checkpoints: the live JSON-lines log, metrics.json, the loss
plot, and the progress display."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

from .checkpoint import atomic_write

#: the optional packages of the ``examples`` extra and what a run lacks without them
EXTRA_FEATURES = {"tqdm": "no progress bar", "matplotlib": "no loss.png"}
EXTRA_INSTALL = "pip install 'modula_mhc[examples]'"
_noted_missing = [False]  # the note is printed once per process


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: import blocked (tests do this)
    return importlib.util.find_spec(name) is not None


def note_missing_extras(stream=None) -> str | None:
    """Print, once per process, which packages of the ``examples`` extra are missing, what the run
    does without them, and the install line; returns the note (None when nothing is missing or it
    was printed already)."""
    missing = [name for name in EXTRA_FEATURES if not _installed(name)]
    if not missing or _noted_missing[0]:
        return None
    _noted_missing[0] = True
    what = "; ".join(f"{name} is not installed: {EXTRA_FEATURES[name]}" for name in missing)
    note = f"note: {what} (both come with the examples extra: {EXTRA_INSTALL})"
    print(note, file=stream if stream is not None else sys.stderr, flush=True)
    return note


def json_safe(obj):
    """NaN/Inf (a skipped step's loss) become null, so the files are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(json_safe(obj), indent=2, allow_nan=False).encode()))


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as it happens — ``{"kind": "step", "step",
    "train_loss", "grad_norm", "lr"}`` after every optimizer step and ``{"kind": "eval", "step",
    "train", "val"}`` after every evaluation. Opening it rewrites the lines of ``history`` (what a
    resumed checkpoint holds), so the log never shows steps the run has forgotten."""

    def __init__(self, path, history: dict):
        lines = [(s, 1, self._step_line(s, loss, g, lr)) for s, loss, g, lr in
                 zip(history["step"], history["train_loss"], history["grad_norm"], history["lr"])]
        lines += [(e["step"], 2, self._eval_line(e)) for e in history["eval"]]
        text = "".join(line for *_, line in sorted(lines, key=lambda t: t[:2]))
        atomic_write(path, lambda f: f.write(text.encode()))
        self.f = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: each record lands at once

    @staticmethod
    def _step_line(step, loss, grad_norm, lr) -> str:
        rec = {"kind": "step", "step": step, "train_loss": loss, "grad_norm": grad_norm, "lr": lr}
        return json.dumps(json_safe(rec), allow_nan=False) + "\n"

    @staticmethod
    def _eval_line(e) -> str:
        return json.dumps(json_safe({"kind": "eval", **e}), allow_nan=False) + "\n"

    def step(self, step, loss, grad_norm, lr) -> None:
        self.f.write(self._step_line(step, loss, grad_norm, lr))

    def eval(self, record: dict) -> None:
        self.f.write(self._eval_line(record))

    def close(self) -> None:
        self.f.close()


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
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return True


class Progress:
    """tqdm when available and wanted, else silent (quiet) or plain prints."""

    def __init__(self, quiet):
        self.quiet, self.bar = quiet, None

    def start(self, total, initial):
        if self.quiet:
            return
        note_missing_extras()
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
            self.bar = None
