"""Character-level text data: the embedded default corpus, file loading with clear errors, batches.

A corpus is a string; its vocabulary is the sorted set of its characters; token i is ``vocab[i]``.
The first 90% of the characters are the training split, the last 10% the validation split, and a
batch is ``batch`` random contiguous windows of ``context + 1`` characters (inputs, shifted targets).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import torch

#: size cap of the embedded default corpus (characters)
DEFAULT_CORPUS_CHARS = 1_500_000
#: name recorded in configs and checkpoints for the embedded corpus
DEFAULT_CORPUS_NAME = "stdlib"


class DataError(ValueError):
    """Unusable data: a missing, non-regular, empty, too short or binary file (message names the file)."""


def default_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> str:
    """The embedded corpus: the top-level ``*.py`` files of this Python's standard library,
    sorted by name and concatenated until ``max_chars`` characters (deterministic per install).

    It needs no download and exists wherever Python runs; files that are not valid UTF-8 are
    skipped (none are, in CPython 3.10-3.13)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    stdlib = sysconfig.get_paths()["stdlib"]
    try:
        names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))
    except OSError as e:  # an embedded / frozen Python without its source tree
        raise DataError(f"the embedded corpus needs the standard library sources in {stdlib!r}: {e}; "
                        f"pass --data PATH instead") from None
    parts, total = [], 0
    for name in names:
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if not corpus:
        raise DataError(f"no readable *.py files in {stdlib!r}; pass --data PATH instead")
    return corpus


def load_text(path) -> str:
    """Read a UTF-8 text file, refusing missing, non-regular (FIFO, device), empty and binary (NUL bytes /
    invalid UTF-8) files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataError(f"data file {path!r} is a directory, not a text file")
    if not os.path.isfile(path):  # a FIFO, socket or device would block or never end: refuse before opening
        raise DataError(f"data file {path!r} is not a regular file (a pipe, socket or device); give a text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"data file {path!r} is empty")
    if b"\x00" in raw:
        raise DataError(f"data file {path!r} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path!r} is not valid UTF-8 text (byte {e.start}); "
                        f"give a UTF-8 text file") from None


def text_sha256(text: str) -> str:
    """sha256 (hex) of ``text`` encoded as UTF-8: the identity of a corpus, independent of its path."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _shortest(need: int, val_fraction: float) -> int:
    """The fewest characters whose split (validation int(n·f), training the rest) gives both parts
    ``need``: searched, as int(n·f) rounds (need / f itself is off by one in floating point)."""
    n = max(2 * need, int(need / val_fraction) - 1)
    while int(n * val_fraction) < need or n - int(n * val_fraction) < need:
        n += 1
    return n


@dataclass
class CharCorpus:
    """A tokenised corpus: ``vocab`` (sorted distinct characters), ``train`` and ``val`` id tensors;
    ``sha256`` of the text (UTF-8) identifies it whatever its path (a checkpoint records it)."""

    vocab: str
    train: torch.Tensor
    val: torch.Tensor
    source: str = ""
    sha256: str = ""

    @classmethod
    def from_text(cls, text: str, context: int, source: str = "", vocab: str | None = None,
                  val_fraction: float = 0.1) -> "CharCorpus":
        """Split ``text`` 90/10 into train/val; each split must hold at least one window of
        ``context + 1`` characters. ``vocab`` (e.g. from a checkpoint) must cover the text."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        where = f"data {source!r}" if source else "data"
        if not text:
            raise DataError(f"{where} is empty")
        if vocab is None:
            vocab = "".join(sorted(set(text)))
        else:
            unknown = set(text) - set(vocab)
            if unknown:
                raise DataError(f"{where} has characters outside the checkpoint's vocabulary: "
                                f"{''.join(sorted(unknown))[:20]!r}")
        if len(vocab) < 2:
            raise DataError(f"{where} has only {len(vocab)} distinct character(s); nothing to learn")
        n_val = int(len(text) * val_fraction)
        need = context + 1
        if n_val < need or len(text) - n_val < need:
            raise DataError(f"{where} is too short: {len(text)} characters; with context {context} it needs "
                            f"at least {_shortest(need, val_fraction)} so that the {int(val_fraction * 100)}% "
                            f"validation split holds one window of {need}")
        table = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([table[ch] for ch in text], dtype=torch.long)
        return cls(vocab=vocab, train=ids[:len(text) - n_val], val=ids[len(text) - n_val:], source=source,
                   sha256=text_sha256(text))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        table = {ch: i for i, ch in enumerate(self.vocab)}
        try:
            return torch.tensor([table[ch] for ch in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def batch(self, split: str, batch: int, context: int, generator: torch.Generator | None = None,
              device="cpu"):
        """(x, y): ``batch`` random windows x = ids[i : i+T], y = ids[i+1 : i+T+1], T = context."""
        data = {"train": self.train, "val": self.val}.get(split)
        if data is None:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if len(data) < context + 1:
            raise ValueError(f"{split} split ({len(data)} tokens) is shorter than context + 1 = {context + 1}")
        start = torch.randint(0, len(data) - context, (batch,), generator=generator)
        offsets = torch.arange(context + 1)
        windows = data[start[:, None] + offsets]
        x, y = windows[:, :-1], windows[:, 1:]
        if torch.device(device).type != "cpu":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y
