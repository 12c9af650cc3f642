"""Fused CPU passes for the mHC stream mixing: ``cpu_mix.c``, compiled on first use and called
through ctypes.

Why: on CPU, torch runs the per-token (n×n)(n×C) products of an mHC layer as batched GEMMs of tiny
matrices at a few GFLOP/s (an (4096, 4, 4) @ (4096, 4, 256) product took 8.8 ms, a copy of the
same stream 2.4 ms); one C loop per pass keeps each token's n×C block in L1 and runs at memory
speed. Same maths as ``mhc_reference`` (float32 accumulation; only the summation order differs).

When it runs: float32 CPU tensors, a C compiler on the machine (``$CC``, else ``cc``), and
``MODULA_MHC_KERNELS`` not set to ``reference``. The library is built once per source, compiler
and CPU into ``$MODULA_MHC_CACHE`` (default ``~/.cache/modula_mhc``, or a temp folder when the home
is read-only); if anything fails the
PyTorch reference runs instead and ``unavailable_reason()`` says why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

__all__ = ["usable", "unavailable_reason", "pre_res", "pre_res_backward", "add_post_", "add_post_backward"]

SOURCE = pathlib.Path(__file__).with_name("cpu_mix.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fPIC", "-shared", "-pthread")
#: tried when FLAGS fail (a compiler without -march=native or the OpenMP SIMD pragmas)
PORTABLE_FLAGS = ("-O2", "-fPIC", "-shared", "-pthread")
_reason: list[str] = []


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> pathlib.Path:
    """$MODULA_MHC_CACHE, else ~/.cache/modula_mhc, else (a read-only home) a per-user temp folder."""
    if os.environ.get("MODULA_MHC_CACHE"):
        return pathlib.Path(os.environ["MODULA_MHC_CACHE"])
    home = pathlib.Path.home() / ".cache" / "modula_mhc"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return pathlib.Path(tempfile.gettempdir()) / f"modula_mhc-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _build(compiler: str) -> pathlib.Path:
    """The shared library for this source and compiler: FLAGS, else PORTABLE_FLAGS."""
    try:
        return _build_with(compiler, FLAGS)
    except subprocess.CalledProcessError:
        return _build_with(compiler, PORTABLE_FLAGS)


def _build_with(compiler: str, flags: tuple[str, ...]) -> pathlib.Path:
    """The shared library for this source, compiler, flags and CPU: compiled once, then reused."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), _cpu_model().encode()])).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"cpu_mix-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # compiled aside, then renamed: safe for parallel builds
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def _library():
    """The loaded library, or None (reason in ``unavailable_reason()``)."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        _reason.append(f"no C compiler ({compiler!r} not found)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        _reason.append(f"building {SOURCE.name} failed: {err} {detail.decode(errors='replace')[-500:]}".strip())
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for name, nptr in (("mix_pre_res", 5), ("mix_pre_res_backward", 8), ("mix_add_post", 3), ("mix_add_post_backward", 5)):
        getattr(lib, name).argtypes = [i64, i64, i64] + [ptr] * nptr + [i32]
        getattr(lib, name).restype = None
    return lib


def unavailable_reason() -> str | None:
    """Why the fused CPU passes do not run here (None when they can)."""
    return None if _library() is not None else (_reason[-1] if _reason else "disabled")


def usable(*tensors: torch.Tensor) -> bool:
    """True when the fused passes can take these inputs: float32 CPU tensors, library built, and
    the reference not forced by ``MODULA_MHC_KERNELS=reference``."""
    if os.environ.get("MODULA_MHC_KERNELS", "").strip().lower() == "reference" or torch.compiler.is_compiling():
        return False  # forced reference, or a graph torch.compile traces (it cannot trace a ctypes call)
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _library() is not None


#: stream floats per thread below which more threads cost more to start than they save
MIN_FLOATS_PER_THREAD = 1 << 16


def _threads(T: int, n: int, C: int) -> int:
    return max(1, min(torch.get_num_threads(), T * n * C // MIN_FLOATS_PER_THREAD))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _tokens(x: torch.Tensor) -> tuple[int, int, int]:
    n, C = x.shape[-2:]
    return x.numel() // (n * C) if x.numel() else 0, n, C


def _require(fn: str, **expected) -> None:
    """Each name=(tensor or None, shape): the C loops index every tensor by its documented layout, so
    its exact shape, dtype, device and contiguity are checked here (metadata only, no host sync) and
    memory safety never depends on the caller."""
    for name, (t, shape) in expected.items():
        if t is not None and (t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu"
                              or not t.is_contiguous()):
            layout = "" if t.is_contiguous() else ", not contiguous"
            raise ValueError(f"cpu_mix.{fn}: {name} must be a contiguous float32 CPU tensor of shape "
                             f"{tuple(shape)}, got {t.dtype} {tuple(t.shape)} on {t.device}{layout}")


def _layouts(fn: str, x: torch.Tensor, **tensors) -> tuple[int, int, int]:
    """(T, n, C) of the stream x (..., n, C), after checking x and ``tensors`` against it: names
    q/p (T, n), H (T, n, n), f/u (..., C), dr/x-like (..., n, C)."""
    T, n, C = _tokens(x)
    lead = x.shape[:-2]
    shapes = {"p": (T, n), "q": (T, n), "H": (T, n, n), "f": lead + (C,), "du": lead + (C,), "dr": x.shape}
    _require(fn, x=(x, x.shape), **{name: (t, torch.Size(shapes[name])) for name, t in tensors.items()})
    return T, n, C


def pre_res(x: torch.Tensor, p: torch.Tensor | None, H: torch.Tensor | None):
    """(u, r): the pre-mix u = Σ_i p_i x_i (..., C) and the residual mix r = H x (..., n, C), each
    None when its coefficients are; x (..., n, C), p (tokens, n), H (tokens, n, n), contiguous float32."""
    T, n, C = _layouts("pre_res", x, p=p, H=H)
    u = None if p is None else x.new_empty(x.shape[:-2] + (C,))
    r = None if H is None else torch.empty_like(x)
    if T:
        _library().mix_pre_res(T, n, C, _ptr(x), _ptr(p), _ptr(H), _ptr(u), _ptr(r), _threads(T, n, C))
    return u, r


def pre_res_backward(x, p, H, du, dr):
    """(dx, dp, dH): dx_j = p_j du + Σ_i H_ij dr_i, dp_i = ⟨x_i, du⟩, dH_ij = ⟨dr_i, x_j⟩ (over C)."""
    T, n, C = _layouts("pre_res_backward", x, p=p, H=H, du=du, dr=dr)
    dx, dp, dH = torch.empty_like(x), x.new_empty((T, n)), x.new_empty((T, n, n))
    if T:
        _library().mix_pre_res_backward(T, n, C, _ptr(x), _ptr(p), _ptr(H), _ptr(du), _ptr(dr),
                                        _ptr(dx), _ptr(dp), _ptr(dH), _threads(T, n, C))
    return dx, dp, dH


def tokens_major(h: torch.Tensor, lead: torch.Size, *tail: int) -> torch.Tensor:
    """Per-token coefficients h, broadcastable to (*lead, *tail), as a contiguous (tokens, *tail) tensor."""
    return h.expand(*lead, *tail).reshape(-1, *tail).contiguous()


def add_post_(out: torch.Tensor, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """out_i += q_i f in place: out (..., n, C), q (tokens, n), f (..., C), all contiguous float32."""
    T, n, C = _layouts("add_post_", out, q=q, f=f)
    if T:
        _library().mix_add_post(T, n, C, _ptr(out), _ptr(q), _ptr(f), _threads(T, n, C))
    return out


def add_post_backward(dout: torch.Tensor, q: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(df, dq): df = Σ_i q_i dout_i (..., C), dq_i = ⟨f, dout_i⟩ (tokens, n)."""
    T, n, C = _layouts("add_post_backward", dout, q=q, f=f)
    df, dq = torch.empty_like(f), dout.new_empty((T, n))
    if T:
        _library().mix_add_post_backward(T, n, C, _ptr(dout), _ptr(q), _ptr(f), _ptr(df), _ptr(dq),
                                         _threads(T, n, C))
    return df, dq
