"""The fused CPU mixing passes (kernels/cpu_mix.c through ctypes): each pass against the batched
torch products it replaces, the mHC layer with and without them, and the fallbacks (no compiler,
float64, MODULA_MHC_KERNELS=reference, torch.compile)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from modula_mhc import atoms, bonds, kernels
from modula_mhc.compounds import HyperConnections
from modula_mhc.kernels import cpu_mix

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_library(monkeypatch):
    """_library() rebuilt under the test's environment, and again after it."""
    cpu_mix._library.cache_clear()
    yield
    monkeypatch.undo()
    cpu_mix._library.cache_clear()


def _inputs(lead, n, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.tensor(lead).prod()) if lead else 1
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(x=r(*lead, n, C), p=r(T, n), H=r(T, n, n), du=r(*lead, C), dr=r(*lead, n, C), f=r(*lead, C), q=r(T, n))


@needs_compiler
@pytest.mark.parametrize("lead,n,C,threads", [((2, 5), 4, 8, 1), ((37,), 3, 7, 2), ((1,), 1, 1, 1), ((9, 4), 5, 33, 3)])
def test_each_pass_matches_the_batched_products(lead, n, C, threads, monkeypatch):
    assert cpu_mix.usable(torch.zeros(1)), cpu_mix.unavailable_reason()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # token chunks over pthreads,
    monkeypatch.setattr(cpu_mix, "MIN_FLOATS_PER_THREAD", 1)        # even for these small streams
    a = _inputs(lead, n, C)
    x, p, H, du, dr, f, q = (a[k] for k in "x p H du dr f q".split())
    xt, drt = x.reshape(-1, n, C), dr.reshape(-1, n, C)
    u, r = cpu_mix.pre_res(x, p, H)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u.reshape(-1, C), (p.unsqueeze(-2) @ xt).squeeze(-2), **close)
    torch.testing.assert_close(r.reshape(-1, n, C), H @ xt, **close)
    assert cpu_mix.pre_res(x, None, H)[0] is None and torch.equal(cpu_mix.pre_res(x, None, H)[1], r)
    assert cpu_mix.pre_res(x, p, None)[1] is None and torch.equal(cpu_mix.pre_res(x, p, None)[0], u)
    dx, dp, dH = cpu_mix.pre_res_backward(x, p, H, du, dr)
    dut = du.reshape(-1, C)
    torch.testing.assert_close(dx.reshape(-1, n, C), p.unsqueeze(-1) * dut.unsqueeze(-2) + H.mT @ drt, **close)
    torch.testing.assert_close(dp, (dut.unsqueeze(-2) @ xt.mT).squeeze(-2), **close)
    torch.testing.assert_close(dH, drt @ xt.mT, **close)
    out = r.clone()
    cpu_mix.add_post_(out, q, f)
    torch.testing.assert_close(out.reshape(-1, n, C), r.reshape(-1, n, C) + q.unsqueeze(-1) * f.reshape(-1, 1, C), **close)
    df, dq = cpu_mix.add_post_backward(dr, q, f)
    torch.testing.assert_close(df.reshape(-1, C), (q.unsqueeze(-2) @ drt).squeeze(-2), **close)
    torch.testing.assert_close(dq, (f.reshape(-1, 1, C) @ drt.mT).squeeze(-2), **close)


@needs_compiler
def test_empty_batch_is_a_no_op():
    x = torch.zeros(0, 4, 8)
    u, r = cpu_mix.pre_res(x, torch.zeros(0, 4), torch.zeros(0, 4, 4))
    assert u.shape == (0, 8) and r.shape == (0, 4, 8)


@needs_compiler
def test_the_c_passes_refuse_tensors_that_do_not_match_the_stream():
    """Shape, dtype and layout are checked at the ctypes boundary: the C loops index every tensor as
    (tokens, ...). The bad tensors here are larger than the pass would read, so a missing check fails
    the test instead of corrupting memory (too-small ones run in a subprocess, below)."""
    a = _inputs((3, 5), 4, 8)
    x, p, H, du, dr, f, q = (a[k] for k in "x p H du dr f q".split())
    bad = {"f": [torch.randn(3, 6, 8), f.double(), torch.randn(3, 5, 16)[..., ::2]], "q": [torch.randn(16, 4)]}
    for name, tensors in bad.items():
        for t in tensors:
            args = {"q": q, "f": f, name: t}
            with pytest.raises(ValueError, match=f"{name} must be a contiguous float32"):
                cpu_mix.add_post_(dr.clone(), args["q"], args["f"])
            with pytest.raises(ValueError, match=f"{name} must be a contiguous float32"):
                cpu_mix.add_post_backward(dr, args["q"], args["f"])
    with pytest.raises(ValueError, match="H must be"):
        cpu_mix.pre_res(x, p, torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="du must be"):
        cpu_mix.pre_res_backward(x, p, H, torch.randn(3, 6, 8), dr)
    with pytest.raises(ValueError, match="x must be"):
        cpu_mix.pre_res(x.transpose(0, 1), p, H)


# Run in a child process: before the fix the float32 passes read and wrote past the end of a
# broadcasting F(u) and the backward aborted the interpreter ("double free or corruption").
_BROADCAST_SCRIPT = r"""
import json, torch
from modula_mhc import kernels
from modula_mhc.compounds import HyperConnections
from modula_mhc.kernels import cpu_mix
torch.set_num_threads(1)
n, C = 4, 5

class Pool(torch.nn.Module):  # (B, T, C) -> (B, 1, C): global context, broadcast over the tokens
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(C, C)
    def forward(self, u):
        return self.lin(u.mean(-2, keepdim=True))

def bias_layer(dtype):  # kernels.mhc_layer around F(u) = b, shape (C,)
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in ((64, n, C), 2 * n + n * n, C))
    w, b = w.requires_grad_(), b.requires_grad_()
    coeffs = lambda raw, sumsq, w: (w[:n], w[n:2 * n], w[2 * n:].view(n, n))
    return lambda x: kernels.mhc_layer(x, lambda u: b, coeffs, None, (w,)), x, [w, b]

def pool_layer(dtype):  # the compound around a pooling branch
    torch.manual_seed(0)
    hc = HyperConnections(Pool(), streams=n, width=C).double().to(dtype)
    x = torch.randn(2, 32, n, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    return hc, x, list(hc.parameters())

def run(make, dtype):
    layer, x, params = make(dtype)
    x = x.requires_grad_()
    out = layer(x)
    out.backward(torch.ones_like(out))
    with torch.no_grad():
        inference = layer(x)
    return [t.double() for t in (out.detach(), inference, x.grad, *(p.grad for p in params))]

errors = {}
for name, make in (("bias", bias_layer), ("pool", pool_layer)):
    f32, f64 = run(make, torch.float32), run(make, torch.float64)
    errors[name] = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(f32, f64)]
try:  # F(u) too small for the stream, straight at the C boundary
    cpu_mix.add_post_backward(torch.randn(64, n, C), torch.randn(64, n), torch.randn(C))
    errors["too small accepted"] = [1.0]
except ValueError:
    pass
print(json.dumps(errors))
"""


@needs_compiler
def test_branches_that_broadcast_match_float64_without_touching_memory_past_them():
    """F(u) of shape (C,) or (B, 1, C) broadcasts as in a plain residual: float32 (C passes) output,
    no-grad output and every gradient agree with float64 (PyTorch reference) to float32 rounding."""
    assert cpu_mix.usable(torch.zeros(1)), cpu_mix.unavailable_reason()
    done = subprocess.run([sys.executable, "-c", _BROADCAST_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MODULA_MHC_KERNELS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    for name, errs in errors.items():
        assert max(errs) < 1e-5, (name, errs)  # before: 1e26 (bias), NaN (pool), or the process aborted


def _layer(static=False, dtype=torch.float32):
    torch.manual_seed(0)
    branch = bonds.GELU() @ atoms.Linear(16, 16)
    return HyperConnections(branch, streams=4, width=16, dynamic=not static).to(dtype)


@needs_compiler
@pytest.mark.parametrize("static", [False, True])
def test_layer_with_the_c_passes_equals_the_reference(static, monkeypatch):
    """Output and every gradient of an mHC layer (fused training path and the no-grad composition)
    agree with the pure-PyTorch reference to float32 rounding."""
    x, g = torch.randn(3, 7, 4, 16), torch.randn(3, 7, 4, 16)
    results = []
    for env in ("", "reference"):
        monkeypatch.setenv("MODULA_MHC_KERNELS", env)
        assert cpu_mix.usable(x) == (env == "")
        hc, xi = _layer(static), x.clone().requires_grad_()
        out = hc(xi)
        out.backward(g)
        with torch.no_grad():
            inference = hc(x)
        results.append((out.detach(), inference, xi.grad, [p.grad for p in hc.parameters()]))
    (o1, i1, gx1, gp1), (o2, i2, gx2, gp2) = results
    close = dict(atol=2e-5, rtol=2e-5)
    for a, b in [(o1, o2), (i1, i2), (gx1, gx2), *zip(gp1, gp2)]:
        torch.testing.assert_close(a, b, **close)
    assert torch.equal(o1, i1)  # training and inference paths share the same C passes: same bits


def test_float64_and_forced_reference_do_not_use_it(monkeypatch):
    assert not cpu_mix.usable(torch.zeros(2, dtype=torch.float64))
    monkeypatch.setenv("MODULA_MHC_KERNELS", "reference")
    assert not cpu_mix.usable(torch.zeros(2))


def test_without_a_compiler_the_reference_runs(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-for-modula-mhc")
    monkeypatch.setenv("MODULA_MHC_CACHE", str(tmp_path))
    assert not cpu_mix.usable(torch.zeros(2))
    assert "no C compiler" in cpu_mix.unavailable_reason()
    hc, x = _layer(), torch.randn(2, 3, 4, 16, requires_grad=True)
    out = hc(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    monkeypatch.setenv("MODULA_MHC_KERNELS", "reference")
    ref_x = x.detach().clone().requires_grad_()
    torch.testing.assert_close(hc(ref_x), out)


@needs_compiler
def test_a_broken_build_falls_back_with_its_reason(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("MODULA_MHC_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_mix, "FLAGS", cpu_mix.FLAGS + ("-no-such-flag-for-modula-mhc",))
    monkeypatch.setattr(cpu_mix, "PORTABLE_FLAGS", cpu_mix.PORTABLE_FLAGS + ("-no-such-flag-for-modula-mhc",))
    assert not cpu_mix.usable(torch.zeros(2))
    assert "failed" in cpu_mix.unavailable_reason()
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


@needs_compiler
def test_a_compiler_without_the_native_flags_gets_the_portable_build(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("MODULA_MHC_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_mix, "FLAGS", cpu_mix.FLAGS + ("-no-such-flag-for-modula-mhc",))
    assert cpu_mix.usable(torch.zeros(2)), cpu_mix.unavailable_reason()
    assert len(list(tmp_path.glob("cpu_mix-*.so"))) == 1
    u, _ = cpu_mix.pre_res(torch.ones(3, 2, 4), torch.ones(3, 2), None)
    assert torch.equal(u, torch.full((3, 4), 2.0))


@needs_compiler
def test_the_library_is_built_once_per_source(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("MODULA_MHC_CACHE", str(tmp_path))
    assert cpu_mix.usable(torch.zeros(2))
    (built,) = tmp_path.glob("cpu_mix-*.so")
    stamp = built.stat().st_mtime_ns
    cpu_mix._library.cache_clear()
    assert cpu_mix.usable(torch.zeros(2))
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("cpu_mix-*.so")] == [stamp]


def test_compiled_graphs_use_the_traceable_reference(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not cpu_mix.usable(torch.zeros(2))
    assert not kernels.fused_layer(torch.zeros(2, 4, 8, requires_grad=True))


def test_small_streams_stay_on_one_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert cpu_mix._threads(8, 4, 16) == 1  # 512 floats: starting threads would cost more
    assert cpu_mix._threads(4096, 4, 256) == 16
    assert cpu_mix._threads(64, 4, 256) == 1 and cpu_mix._threads(128, 4, 256) == 2


@needs_compiler
def test_a_read_only_home_builds_in_a_temp_folder(fresh_library, monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.delenv("MODULA_MHC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(home)) and real_access(path, mode))
    monkeypatch.setattr(cpu_mix.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert cpu_mix.usable(torch.zeros(2)), cpu_mix.unavailable_reason()
    assert list((tmp_path / "tmp").glob("modula_mhc-*/cpu_mix-*.so"))
    assert not list(home.rglob("*.so"))
