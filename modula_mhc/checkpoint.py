"""Checkpoints and run directories: atomic writes, a checksum verified on load, one run per directory.

* :func:`atomic_write` — readers see the old or the new file, never a torn one; files get the
  ordinary mode (0666 minus the umask: 0644 by default).
* :func:`save_checkpoint` / :func:`load_checkpoint` — a dict tagged with ``CHECKPOINT_FORMAT`` and a
  sha256 of its content (every tensor's bytes, dtype and shape, and every other value), checked on
  load; any problem is one :class:`CheckpointError` line naming the file.
* :class:`RunDirectory` — creates ``out``, locks it (a second run into it fails at once) and refuses
  to overwrite an earlier run's outputs unless resuming or forced.
"""
from __future__ import annotations

import ctypes
import errno
import filecmp
import glob
import hashlib
import os
import random
import secrets

import torch

from .config import ConfigError


class CheckpointError(ValueError):
    """A missing, truncated, corrupted, foreign or incompatible checkpoint, or one that cannot be
    written (the message names the file)."""


CHECKPOINT_FORMAT = "modula_mhc.train.checkpoint/2"
REQUIRED_KEYS = ("config", "vocab", "step", "model", "optimizer", "rng", "history")
#: files a run writes into its directory (an earlier run's are never replaced silently)
RUN_FILES = ("ckpt.pt", "metrics.json", "metrics.jsonl", "loss.png", "sample.txt")
LOCK_FILE = ".lock"


# ---------------------------------------------------------------------------------- atomic writes

def atomic_write(path, write) -> None:
    """Write a file so that readers see the old or the new content, never a torn one:
    ``write(f)`` fills a temporary file in the same directory, which is fsynced and then
    ``os.replace``-d onto ``path`` (atomic on POSIX and Windows); the directory is fsynced too.
    On any error (a full disk included) the old file is untouched and the temporary removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
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
    for stale in glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(prefix)}*.tmp")):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------- checksum

def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def _digest(obj, h) -> None:
    """Feed a canonical encoding of ``obj`` to hash ``h``: tensors by dtype, shape and bytes,
    containers in order, other values by type and repr (both survive a save/load round trip)."""
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}:".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_checksum(payload: dict) -> str:
    """sha256 (hex) of a checkpoint dict without its ``checksum`` entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- save and load

def _serialize(payload, f) -> None:
    torch.save(payload, f)


def save_checkpoint(path, payload: dict) -> None:
    """Atomically write a checkpoint dict tagged with ``CHECKPOINT_FORMAT`` and its sha256. A write
    that fails (full disk, permissions) raises :class:`CheckpointError`; the old file survives."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    payload["checksum"] = payload_checksum(payload)
    try:
        atomic_write(path, lambda f: _serialize(payload, f))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {os.fspath(path)!r}: {e.strerror or e}; "
                              "the previous checkpoint (if any) is unchanged") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` and verify its checksum; a missing,
    truncated, corrupted or foreign file raises :class:`CheckpointError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist" if not os.path.exists(path)
                              else f"checkpoint {path!r} is not a regular file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError / UnpicklingError / EOFError / zipfile errors; torch's text
        raise CheckpointError(f"checkpoint {path!r} is unreadable: truncated, corrupted or not a torch file "
                              f"({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a modula_mhc training checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r}, found {found!r})")
    missing = [k for k in (*REQUIRED_KEYS, "checksum") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {', '.join(missing)}")
    if payload_checksum(payload) != payload["checksum"]:
        raise CheckpointError(f"checkpoint {path!r} is corrupted: its sha256 checksum does not match its content")
    return payload


def find_checkpoint(resume, out) -> str:
    """The checkpoint file that ``resume`` names: a file, a run directory, or (True) ``<out>/ckpt.pt``
    when the run directory is known (``--out`` or ``--name``), else the most recently written
    ``runs/*/ckpt.pt``."""
    if resume is True:
        if out is not None:
            path = os.path.join(out, "ckpt.pt")
            if not os.path.isfile(path):  # never fall back to another run: the caller named this one
                raise CheckpointError(f"--resume without a path continues {path!r}, which does not exist; "
                                      "give the checkpoint's path, or start the run without --resume")
            return path
        candidates = sorted((os.path.getmtime(p), p) for p in glob.glob(os.path.join("runs", "*", "ckpt.pt")))
        if not candidates:
            raise CheckpointError("--resume without a path found no runs/*/ckpt.pt; give the checkpoint path")
        return candidates[-1][1]
    resume = os.fspath(resume)
    return os.path.join(resume, "ckpt.pt") if os.path.isdir(resume) else resume


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


# ---------------------------------------------------------------------------------- run directory

class RunDirectory:
    """``out`` made ready for one run: created, locked against a second concurrent run (POSIX
    ``flock`` on ``out/.lock``, released when the process ends), and — for a fresh run — free of an
    earlier run's outputs (``force=True`` deletes them); when resuming the checkpoint file
    ``resumes`` in its own directory, holding no outputs but that run's. Raises :class:`ConfigError`
    (option ``out`` or ``resume``) with one line. Use as a context manager, or call :meth:`close`."""

    def __init__(self, out, fresh: bool, force: bool = False, resumes=None):
        self.path, self._fd = os.fspath(out), None
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError("out", f"{self.path!r} exists and is not a directory")
        self.created = not os.path.exists(self.path)  # removed again if the run fails before writing
        try:
            os.makedirs(self.path, exist_ok=True)
            self._fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError("out", f"cannot use {self.path!r} as the run directory: {e.strerror or e}") from None
        self._lock()
        try:
            earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(self.path, f))]
            if fresh and earlier and not force:
                raise ConfigError("out", f"{self.path!r} already holds a run ({', '.join(earlier)}); pass --resume "
                                         "to continue it, --force to replace it, or another --out/--name")
            if fresh:
                for f in earlier:
                    os.unlink(os.path.join(self.path, f))
            elif resumes is not None and earlier and not self._holds(resumes):
                raise ConfigError("resume", f"{os.fspath(resumes)!r} is not the run in {self.path!r}, which holds "
                                            f"another run ({', '.join(earlier)}); pass --out DIR to continue it "
                                            "in a new directory")
        except BaseException:
            self.close()
            raise

    def _holds(self, checkpoint) -> bool:
        """Whether this directory's outputs belong to ``checkpoint``: its ckpt.pt is that file or a
        byte-identical copy. Anything else — another run, or another state of this one — would be
        overwritten by resuming here."""
        own = self.file("ckpt.pt")
        if not os.path.isfile(own):
            return False  # outputs without a checkpoint: another run's, as far as we can tell
        return os.path.samefile(own, checkpoint) or filecmp.cmp(own, checkpoint, shallow=False)

    def _lock(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock (docs/checkpoints.md)
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            self.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError("out", f"{self.path!r} is in use by another run (pid {holder}); "
                                         "wait for it or choose another --out") from None
            raise ConfigError("out", f"cannot lock {self.path!r}: {e.strerror or e}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self._drop_stillborn_log()
            if self.created and os.listdir(self.path) == [LOCK_FILE]:
                os.unlink(self.file(LOCK_FILE))  # a run that failed before writing leaves no empty directory
                os.rmdir(self.path)
        self.close()
        return False

    def _drop_stillborn_log(self) -> None:
        """After a failure (e.g. out of memory at the first step): a ``metrics.jsonl`` with no step in
        it, beside no checkpoint and no metrics.json, holds nothing a rerun would lose (at most the
        step-0 evaluation) — removed, so that it does not make the directory "hold a run"."""
        log = self.file("metrics.jsonl")
        if any(os.path.exists(self.file(f)) for f in RUN_FILES if f != "metrics.jsonl") or not os.path.isfile(log):
            return
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                if any('"kind": "step"' in line for line in f):
                    return
            os.unlink(log)
        except OSError:
            pass
