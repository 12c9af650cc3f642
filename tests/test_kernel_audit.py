"""Adversarial audit of the kernels and the mHC layer: every path against float64 autograd at ragged
shapes, layouts and dtypes; Sinkhorn at extreme finite logits; msign / gram_polar on degenerate and
ill-conditioned inputs; the mHC sensitivity claim under gradient ascent inside its declared domain.

Each test names the defect it pins (found by this audit) or the claim it attacks. The Triton cases
at the end run under TRITON_INTERPRET=1 (``-m triton``), like tests/test_kernels_triton.py.
"""

import itertools
import math
import os
import subprocess
import warnings

import pytest
import torch

import modula_mhc.kernels as K
from modula_mhc import atoms
from modula_mhc.compounds import HyperConnections
from modula_mhc.kernels import cpu_mix
from modula_mhc.kernels import sinkhorn_reference as SR

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _unrolled(L, iters):
    """Float64 Sinkhorn in the log domain, rows then columns, unrolled for autograd."""
    X = L
    for _ in range(iters):
        X = X - torch.logsumexp(X, -1, keepdim=True)
        X = X - torch.logsumexp(X, -2, keepdim=True)
    return X.exp()


def _marginals(P):
    P = P.double()
    return max((P.sum(-1) - 1).abs().max().item(), (P.sum(-2) - 1).abs().max().item())


def _layout(t, kind):
    """t with the same values in another memory layout."""
    if kind == "transposed":
        return t.mT.contiguous().mT
    if kind == "sliced":  # every other element of a wider buffer
        big = torch.zeros(*t.shape[:-1], 2 * t.size(-1), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "expanded" and t.ndim >= 3:  # stride 0 over the leading dim
        return t[:1].expand(t.shape)
    return t


def _rel_err(got, want, scale, dtype):
    """max |got − want| / scale, elementwise, where ``scale`` is the same computation on |inputs|
    (so cancellation in the exact value is not counted against the kernel) floored at the dtype's
    smallest normal (subnormal results carry absolute, not relative, rounding)."""
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want).abs() / scale.clamp_min(torch.finfo(dtype).tiny)).max().item()


# a few units of roundoff of the dtype, with fp32 accumulation inside every kernel
_MIX_TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _check_mixing(fn, naive, inputs, dtype, needs, kind, seed=0):
    """fn(inputs in ``dtype`` and layout ``kind``; only ``needs`` require grad) against float64
    autograd through ``naive``, forward and backward, with condition-aware scales."""
    g = torch.Generator().manual_seed(seed)
    ins = [_layout(t.to(dtype), kind).detach().requires_grad_(nd) for t, nd in zip(inputs, needs)]
    ref_in = [t.detach().double().requires_grad_(nd) for t, nd in zip(ins, needs)]
    abs_in = [t.detach().double().abs().requires_grad_(nd) for t, nd in zip(ins, needs)]
    out, ref, absout = fn(*ins), naive(*ref_in), naive(*abs_in)
    out, ref, absout = [o if isinstance(o, tuple) else (o,) for o in (out, ref, absout)]
    # grad_output rounded to the output dtype, as autograd hands it to the kernel
    gs = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(o.dtype).double() for o, r in zip(out, ref)]
    errs = []
    for o, r, s in zip(out, ref, absout):
        assert o.shape == r.shape
        errs.append(_rel_err(o, r, s.detach(), dtype))
    sum((o.double() * gg).sum() for o, gg in zip(out, gs)).backward()
    sum((r * gg).sum() for r, gg in zip(ref, gs)).backward()
    sum((s * gg.abs()).sum() for s, gg in zip(absout, gs)).backward()
    for t, r, s, nd in zip(ins, ref_in, abs_in, needs):
        if nd:
            assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
            errs.append(_rel_err(t.grad, r.grad, s.grad, dtype))
        else:
            assert t.grad is None
    return max(errs)


def _naive_pre(x, h):
    return torch.einsum("...n,...nc->...c", h, x)


def _naive_post(x, f, H, q):
    return torch.einsum("...ij,...jc->...ic", H, x) + q.unsqueeze(-1) * f.unsqueeze(-2)


def _naive_coeff(xf, phi):
    return xf @ phi, (xf * xf).sum(-1)


def _mixing_cases(tokens, streams, widths, dtypes):
    """(kernel, naive, inputs, dtype, needs, layout) over the grid, rotating layouts and which
    inputs need a gradient so that every combination appears without the full product."""
    kinds = ["contiguous", "transposed", "sliced", "expanded"]
    pre_needs = [(True, True), (True, False), (False, True)]
    post_needs = [(True,) * 4, (True, False, False, True), (False, True, True, False), (False, False, False, True)]
    g = torch.Generator().manual_seed(0)
    k = 0
    for T, n, C in itertools.product(tokens, streams, widths):
        x = torch.randn(T, n, C, generator=g)
        h, q = torch.rand(T, n, generator=g), torch.rand(T, n, generator=g)
        f, H = torch.randn(T, C, generator=g), torch.rand(T, n, n, generator=g)
        phi = torch.randn(n * C, 2 * n + n * n, generator=g) / math.sqrt(n * C)
        for dtype in dtypes:
            k += 1
            kind = kinds[k % 4]
            yield K.mhc_pre, _naive_pre, [x, h], dtype, pre_needs[k % 3], kind
            yield K.mhc_post_res, _naive_post, [x, f, H, q], dtype, post_needs[k % 4], kind
            yield K.mhc_coeff_input, _naive_coeff, [x.flatten(-2), phi], dtype, pre_needs[(k + 1) % 3], kind


# --------------------------------------------------------------------------------------------
# 1. mixing kernels (reference + fused C passes) against float64 autograd
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_mixing_kernels_match_float64_autograd_at_ragged_shapes_layouts_and_partial_grads(dtype):
    """Claim: every path (float32 CPU: the fused C passes) equals its reference forward and
    backward. Tokens 0/1/5/17, streams 1/2/3/4/8, widths 1/3/17/65, transposed / sliced / expanded
    inputs, gradients on some inputs only. Measured worst: fp64 2e-15, fp32 8.6e-7, bf16 3.9e-3,
    fp16 4.9e-4 (relative to the same sums of |terms|)."""
    worst = 0.0
    for fn, naive, inputs, dt, needs, kind in _mixing_cases([0, 1, 5, 17], [1, 2, 3, 4, 8], [1, 3, 17, 65], [dtype]):
        worst = max(worst, _check_mixing(fn, naive, inputs, dt, needs, kind))
    assert worst <= _MIX_TOL[dtype], worst


def test_the_c_passes_ran_in_that_test():
    """The float32 cases above exercise the C passes only where the library builds."""
    if cpu_mix.unavailable_reason() is not None:
        pytest.skip(f"fused CPU passes unavailable: {cpu_mix.unavailable_reason()}")
    assert cpu_mix.usable(torch.zeros(2, 3, 4))


def test_cpu_mix_build_timeout_and_unusable_cache_fall_back(monkeypatch, tmp_path):
    """Claim 5: a compiler that hangs (subprocess timeout, not a CalledProcessError) and a cache
    folder that cannot be created both leave the reference running, with a reason, and no temp file."""
    x = torch.randn(3, 4, 5, requires_grad=True)
    h = torch.rand(3, 4)
    want = K.mhc_pre(x, h)

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 120)

    for setup in ("timeout", "cache"):
        cpu_mix._library.cache_clear()
        with monkeypatch.context() as m:
            if setup == "timeout":
                m.setenv("MODULA_MHC_CACHE", str(tmp_path))
                m.setattr(cpu_mix.subprocess, "run", hang)
            else:
                m.setenv("MODULA_MHC_CACHE", os.devnull + "/modula-mhc-cache")  # a path under a file
            assert not cpu_mix.usable(x)
            assert "failed" in cpu_mix.unavailable_reason()
            got = K.mhc_pre(x, h)
            got.sum().backward()
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        cpu_mix._library.cache_clear()
    assert not list(tmp_path.iterdir())  # the aborted build left nothing behind


# --------------------------------------------------------------------------------------------
# 2. Sinkhorn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_finite_logits_whose_spread_overflows_float32_are_exact_not_nan(dtype):
    """Defect: ±3e38 logits (finite; max − min overflows float32) returned all NaN whenever a
    column of the first row step was −inf, e.g. [[3e38, −3e38]] twice (the exact answer is 1/2
    everywhere); the docs said such logits 'are not an error: they take the log domain'. The
    reference now runs those in float64: result, gradient and err as float64's iteration."""
    L = torch.tensor([[3e38, -3e38], [3e38, -3e38]]).to(dtype).requires_grad_()
    P, err = K.sinkhorn(L, return_error=True)
    assert P.dtype == dtype and err.dtype == torch.float32
    assert torch.equal(P.float(), torch.full((2, 2), 0.5)) and err.item() == 0
    P.sum().backward()
    assert torch.isfinite(L.grad).all()
    g = torch.Generator().manual_seed(0)
    L = ((torch.randint(0, 2, (64, 4, 4), generator=g) * 2 - 1) * 3e38).to(dtype).requires_grad_()
    P, err = K.sinkhorn(L, iters=20, return_error=True)
    L64 = L.detach().double().requires_grad_()
    R = _unrolled(L64, 20)
    w = torch.randn(P.shape, generator=g).to(dtype)
    (P.double() * w.double()).sum().backward()
    (R * w.double()).sum().backward()
    assert torch.isfinite(P).all() and torch.isfinite(L.grad).all() and math.isfinite(err.item())
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    assert (P.double() - R).abs().max().item() <= tol
    assert (L.grad.double() - L64.grad).abs().max().item() <= tol * max(1.0, L64.grad.abs().max().item())
    assert abs(err.item() - _marginals(P)) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", K.SinkhornConvergenceWarning)
        P = K.sinkhorn(L.detach(), tol=1e-5, max_iters=50)
    assert torch.isfinite(P).all()


_EXTREME = {
    "pm1e4": lambda g: (torch.randint(0, 2, (32, 4, 4), generator=g) * 2 - 1) * 1e4,
    "all_equal": lambda g: torch.full((4, 4, 4), 7.0),
    "one_huge": lambda g: torch.zeros(4, 4, 4) + 1e4 * torch.eye(4)[0].outer(torch.eye(4)[0]),
    "std40": lambda g: torch.randn(32, 4, 4, generator=g) * 40,
    "spread59": lambda g: torch.rand(32, 4, 4, generator=g) * 59,
    "spread61": lambda g: torch.rand(32, 4, 4, generator=g) * 61,
    "n1": lambda g: torch.randn(5, 1, 1, generator=g) * 1e4,
    "n3_ragged_batch": lambda g: torch.randn(2, 3, 3, 3, generator=g) * 5,
    "tiny": lambda g: torch.randn(8, 5, 5, generator=g) * 1e-30,
}


@pytest.mark.parametrize("case", sorted(_EXTREME))
@pytest.mark.parametrize("path", ["kept", "recomputed"])
def test_sinkhorn_extreme_finite_logits_forward_backward_and_err(case, path, monkeypatch):
    """Claim 2 at ±1e4, all-equal, one huge entry, std 40, spreads either side of the exp/log switch,
    n = 1, tiny logits; iterates kept by the forward or recomputed (chunked) in the backward:
    no NaN, columns exact (last half-step), err = the measured marginal error, forward and gradient
    equal to float64 autograd through the unrolled loop (fp32: 2e-4 abs at ±1e4 logits, where
    float32 cannot hold L − logsumexp(L) better; 1e-6 elsewhere)."""
    if path == "recomputed":
        monkeypatch.setattr(SR, "_KEEP_STATES_BYTES", 0)
        monkeypatch.setattr(SR, "_BACKWARD_CHUNK_BYTES", 2 * 20 * 16 * 4 * 3)  # 3 matrices per chunk
    L = _EXTREME[case](torch.Generator().manual_seed(1)).float()
    Lg = L.clone().requires_grad_()
    P, err = K.sinkhorn(Lg, iters=20, return_error=True)
    w = torch.randn(P.shape, generator=torch.Generator().manual_seed(2))
    (P * w).sum().backward()
    L64 = L.double().requires_grad_()
    R = _unrolled(L64, 20)
    (R * w.double()).sum().backward()
    assert torch.isfinite(P).all() and torch.isfinite(Lg.grad).all()
    assert (P.double().sum(-2) - 1).abs().max().item() <= 5e-7
    assert abs(err.item() - _marginals(P)) <= 2e-7
    tol = 2e-4 if case == "pm1e4" else 2e-6
    assert (P.double() - R).abs().max().item() <= tol
    assert (Lg.grad.double() - L64.grad).abs().max().item() <= tol * max(1.0, L64.grad.abs().max().item())


def test_sinkhorn_iteration_count_is_what_is_asked():
    """iters=k is exactly k row+column iterations (against the unrolled loop, float64), and tol
    mode's backward is the unrolled gradient of the iterations it ran."""
    L = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    for k in (1, 2, 7, 31):
        assert torch.allclose(K.sinkhorn(L, iters=k), _unrolled(L, k), atol=1e-14, rtol=0)
    Lg = L.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", K.SinkhornConvergenceWarning)
        P = K.sinkhorn(Lg, tol=1e-10, max_iters=37)
    hits = [k for k in range(1, 38) if torch.equal(P, K.sinkhorn(L, iters=k))]
    assert hits, "tol mode stopped after an iteration count that fixed mode does not reproduce"
    (P * L.cos()).sum().backward()
    L2 = L.clone().requires_grad_()
    (_unrolled(L2, hits[0]) * L.cos()).sum().backward()
    assert torch.allclose(Lg.grad, L2.grad, atol=1e-12, rtol=0)


@pytest.mark.slow  # ~6 s: gradient ascent over many logits (make test-slow)
def test_unrolled_sinkhorn_row_l1_jacobian_stays_below_one():
    """hyper_bounds' k_res = 1 (max_i Σ_j |dP_ij| ≤ ‖dL‖_F) is proven for the converged projection;
    docs/mhc.md leaves the unrolled 20-iteration map as a caveat. Gradient ascent over L on the
    exact Jacobian norm (max over sign vectors) finds at most 0.9998 (T = 1), 0.75 (T = 2),
    0.50 (T = 20): the constant holds for the unrolled map too."""
    n = 4
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64)

    def k_res(L, T):
        J = torch.autograd.functional.jacobian(lambda v: _unrolled(v.reshape(n, n).mT, T).mT.reshape(-1),
                                               L.reshape(-1), create_graph=True).reshape(n, n, n * n)
        return torch.einsum("sj,ijk->isk", signs, J).norm(dim=-1).max()

    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 20):
        worst = 0.0
        for std in (0.5, 4.0):
            L = (torch.randn(n, n, generator=g, dtype=torch.float64) * std).requires_grad_()
            opt = torch.optim.Adam([L], lr=0.1)
            for _ in range(25):
                k = k_res(L, T)
                opt.zero_grad()
                (-k).backward()
                opt.step()
            worst = max(worst, k_res(L.detach(), T).item())
        assert worst <= 1.0 + 1e-9, (T, worst)


# --------------------------------------------------------------------------------------------
# 3. msign and gram_polar
# --------------------------------------------------------------------------------------------


def _matrix(kind, m, n, g):
    k = min(m, n)
    if kind == "gauss":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    i = torch.arange(k, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    s = {"rank1": (i < 1).double(), "rank2+noise": torch.where(i < 2, one, 1e-9 * one),
         "orthogonal": torch.ones(k, dtype=torch.float64),
         "cond1e4": 1e4 ** (-i / max(k - 1, 1)), "cond1e7": 1e7 ** (-i / max(k - 1, 1)),
         "cond1e10": 1e10 ** (-i / max(k - 1, 1)), "spike+flat": torch.where(i < 1, one, 3e-3 * one)}[kind]
    return (U * s) @ V.mT


_SHAPES = [(48, 200), (200, 48), (64, 64), (1, 37), (37, 1), (1, 1), (2, 300), (3, 9), (9, 3), (5, 14)]
_KINDS = ["gauss", "rank1", "rank2+noise", "orthogonal", "cond1e4", "cond1e7", "cond1e10", "spike+flat"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_msign_eight_steps_bounds_on_adversarial_spectra(dtype):
    """msign's default 8 steps on Gaussian, rank-1, rank-2 + 1e-9 noise, orthogonal, condition
    1e4/1e7/1e10 and spike + flat tail, tall/wide/square/1×n: σ_max(A) ≤ 1 + 5e-7 (fp32 rounding;
    measured 4e-7 at 256² Gaussians) and ⟨G, A⟩ ≥ 0.997‖G‖_* (measured ≥ 0.9994)."""
    g = torch.Generator().manual_seed(3)
    for shape, kind in itertools.product(_SHAPES, _KINDS):
        G = _matrix(kind, *shape, g)
        A = K.msign(G.to(dtype), 8)
        assert A.dtype == dtype and A.shape == G.shape and torch.isfinite(A).all()
        s = torch.linalg.svdvals(A.double())
        assert s.max().item() <= 1 + 5e-7, (shape, kind, s.max().item() - 1)
        assert (A.double() * G).sum().item() >= 0.997 * torch.linalg.svdvals(G).sum().item(), (shape, kind)


def test_msign_six_steps_dual_ratio_holds_only_on_the_measured_families():
    """Limit of docs/kernels.md's '⟨G, A⟩ ≥ 0.997‖G‖_*' with 6 steps (Euclidean's default): it
    holds on the measured families (Gaussian, rank-1, condition 1e4/1e7) but not on a spike with a
    flat tail of singular values 3e-3 (a gradient with a noise floor), which 6 steps map only to
    p(3e-3) ≈ 0.4: ratio 0.985 (48×200), 0.967 (128²). σ_max ≤ 1 still holds (the 6-step
    polynomial's maximum is 0.999998 < 1), and 8 steps restore ≥ 0.997."""
    g = torch.Generator().manual_seed(3)
    G = _matrix("spike+flat", 128, 128, g)
    nuclear = torch.linalg.svdvals(G).sum().item()
    A6, A8 = K.msign(G, 6), K.msign(G, 8)
    assert (A6 * G).sum().item() / nuclear < 0.99
    assert (A8 * G).sum().item() / nuclear >= 0.997
    assert torch.linalg.svdvals(A6).max().item() <= 1.0


def test_msign_half_precision_stays_within_its_rounding():
    """bf16 / fp16: σ_max ≤ 1 + 8e-3 / 1e-3 (measured 4.3e-3 / 6.1e-4; the reference docstring's
    'none exceeds 1 + 1e-3' is for float32/float64)."""
    g = torch.Generator().manual_seed(4)
    for shape, kind in itertools.product([(48, 200), (64, 64), (5, 14), (1, 37)], _KINDS):
        G = _matrix(kind, *shape, g)
        for dtype, lim in ((torch.bfloat16, 8e-3), (torch.float16, 1e-3)):
            A = K.msign(G.to(dtype), 8)
            assert torch.isfinite(A).all() and A.dtype == dtype
            assert torch.linalg.svdvals(A.double()).max().item() <= 1 + lim, (shape, kind, dtype)


@pytest.mark.parametrize("fn", [K.msign, K.gram_polar])
def test_polar_of_empty_matrices_is_empty(fn):
    """Defect: msign of an m×0 or 0×n matrix raised 'cannot reshape tensor of 0 elements'
    (gram_polar: an IndexError from amax); a zero-size batch already worked."""
    for shape in [(5, 0), (0, 5), (0, 0), (2, 0, 3), (3, 4, 0), (0, 4, 6)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            A = fn(torch.zeros(shape, dtype=dtype))
            assert A.shape == shape and A.dtype == dtype


def test_msign_layouts_and_batches_equal_the_contiguous_loop():
    """Transposed, strided and expanded inputs and batched stacks give the contiguous result."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 130, generator=g)
    want = K.msign(X)
    assert torch.equal(K.msign(X.mT.contiguous().mT), want)
    assert torch.equal(K.msign(_layout(X, "sliced")), want)
    assert torch.equal(K.msign(X[None].expand(3, 40, 130))[1], want)
    B = torch.randn(3, 4, 10, 33, generator=g)
    loop = torch.stack([K.msign(b) for b in B.reshape(-1, 10, 33)]).reshape(B.shape)
    assert torch.allclose(K.msign(B), loop, atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cond", [3e6, 9e6])
def test_gram_polar_is_orthogonal_to_rounding_up_to_condition_1e7(dtype, cond):
    """Defect: gram_polar(refine=True) promised a result 'orthogonal to float rounding up to
    condition numbers ~1e7' but took one Newton–Schulz step after the Gram route, leaving its
    ε·cond² error squared once: max|QᵀQ − I| reached 1.5e-4 at condition 9e6 (float64). It now
    polishes until QᵀQ = I to rounding (≤ 3 more steps, ill-conditioned input only)."""
    g = torch.Generator().manual_seed(int(cond) % 1000)
    for m, n in [(200, 48), (48, 200), (64, 64), (512, 16), (3, 9)]:
        k = min(m, n)
        U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
        s = cond ** (-torch.arange(k, dtype=torch.float64) / (k - 1))
        A = K.gram_polar(((U * s) @ V.mT).to(dtype)).double()
        Q = A if m >= n else A.mT
        err = (Q.mT @ Q - torch.eye(k, dtype=torch.float64)).abs().max().item()
        assert err <= (1e-11 if dtype == torch.float64 else 1e-6), (m, n, err)


# --------------------------------------------------------------------------------------------
# 4. the mHC layer
# --------------------------------------------------------------------------------------------


def _seq_norm(t):
    return t.pow(2).mean(-1).sqrt().max()


def _unit_rms(t):
    return t / t.pow(2).mean(-1, keepdim=True).sqrt()


def _ascend_sensitivity(constrained, depth, gate_scale, steps, seed=0, n=4, C=8, T=2):
    """Gradient ascent of ‖J dx‖ / ‖dx‖ (stream norm, J dx by float64 central differences) over
    unit-RMS streams x, directions dx and every weight inside the declared domain: branch F = a
    Linear with ‖W‖₂ ≤ 1 (ν_F = 1, ‖F(u)‖ ≤ Σ|h_pre| ≤ M_F given), ‖φ‖ ≤ 1, |g| ≤ 1, any static
    logits for mHC (the HC static mixing norm ≤ 1). Returns (claimed sensitivity, worst measured)."""
    torch.manual_seed(seed)
    m_f = float(n) if constrained else 1.0 + n * gate_scale
    hc = HyperConnections(atoms.Linear(C, C), streams=n, depth=depth, gate_scale=gate_scale,
                          constrained=constrained, branch_output_bound=m_f).double()
    claim = float(hc.sensitivity)
    phi_gain = float(hc.phi.gain)
    # warm start where the direct term is tight: the same direction in every stream, W = I, and for
    # mHC saturated pre/post logits (Σ h_pre → n, h_post → 2); HC starts at its own init (b well-normed)
    b = torch.randn(hc.static.weight.numel()) * 3
    if constrained:
        b[:2 * n] = 8.0
    else:
        b = hc.static.weight.detach().float().clone()
    raw = dict(x=torch.randn(T, n, C), dx=torch.randn(T, 1, C).expand(T, n, C).clone(), W=torch.eye(C) + 0.01 * torch.randn(C, C),
               phi=torch.randn(*hc.phi.weight.shape), g=torch.randn(3), b=b)
    raw = {k: v.double().requires_grad_() for k, v in raw.items()}
    opt = torch.optim.Adam(raw.values(), lr=0.05)
    best = 0.0
    for _ in range(steps):
        x, dx = _unit_rms(raw["x"]), raw["dx"] / _seq_norm(raw["dx"])
        W = raw["W"] / torch.linalg.matrix_norm(raw["W"], 2).clamp_min(1.0)
        phi = raw["phi"] / (torch.linalg.matrix_norm(raw["phi"], 2) * phi_gain).clamp_min(1.0)
        b = raw["b"]
        if not constrained:
            bp, bq, br = b[:n], b[n:2 * n], b[2 * n:].reshape(n, n)
            b = b / torch.stack([bp.abs().sum(), bq.abs().max(), br.abs().sum(-1).max()]).max().clamp_min(1.0)
        params = {"branch.weight": W, "phi.weight": phi, "gate.weight": torch.tanh(raw["g"]), "static.weight": b}
        f = lambda z: torch.func.functional_call(hc, params, (z,))  # noqa: E731
        val = _seq_norm((f(x + 1e-6 * dx) - f(x - 1e-6 * dx)) / 2e-6)
        best = max(best, val.item())
        opt.zero_grad()
        (-val).backward()
        opt.step()
    return claim, best


@pytest.mark.parametrize("constrained,depth,gate_scale,reached", [(True, 4, 0.01, 0.95), (True, None, 0.3, 0.5), (False, 4, 0.01, 0.9)])
def test_mhc_sensitivity_claim_survives_gradient_ascent_inside_its_domain(constrained, depth, gate_scale, reached):
    """Claim 4 (hyper_bounds.sensitivity_constants): with every assumption of docs/mhc.md met
    exactly (not only at parallel streams), ascent over inputs, directions and weights stays below
    the claim. Measured (300 steps, 3 seeds, cold start): mHC L=4 gates 0.01: 2.756 of 2.824 (the
    bound is nearly tight: Σh_pre → n, h_post → 2 are reachable); mHC L=None gates 0.3: 9.81 of
    14.88 (the dynamic part is loose at large gates); HC L=4 gates 0.01: 1.090 of 1.154."""
    claim, worst = _ascend_sensitivity(constrained, depth, gate_scale, steps=80)
    assert worst <= claim * (1 + 1e-6), (worst, claim)
    assert worst >= reached * claim  # the ascent got close: the check has teeth


@pytest.mark.parametrize("streams", [1, 2, 3, 4, 8])
def test_mhc_init_and_residual_doubly_stochastic(streams):
    """Init as documented (gates g = 1 at scale 0.01, H_res diagonal 0.95 from τ, h_pre = 1/n,
    h_post = 1; static mHC h_pre_i = (1.5 − i/(n−1))/n), H_res rows exact and columns within the
    reported marginal error, streams = 1 with zero gates exactly x + F(x), for mHC and HC."""
    n, C = streams, 8
    hc = HyperConnections(atoms.Linear(C, C), streams=n).double()
    assert hc.gate.weight.tolist() == [1.0, 1.0, 1.0] and hc.gate.scale == 0.01
    H = hc.static_residual()
    assert torch.allclose(H.diagonal(), torch.full((n,), 1.0 if n == 1 else 0.95, dtype=torch.float64), atol=1e-9)
    with torch.no_grad():
        hc.gate.weight.zero_()
        pre, post, _ = hc.coefficients(torch.randn(3, n, C, dtype=torch.float64))
    assert torch.allclose(pre, torch.full_like(pre, 1.0 if n == 1 else 1.0 / n)) and torch.allclose(post, torch.ones_like(post))
    if n > 1:
        static = HyperConnections(atoms.Linear(C, C), streams=n, dynamic=False).double()
        with torch.no_grad():
            pre = static.coefficients(torch.randn(3, n, C, dtype=torch.float64))[0][0]
        want = torch.tensor([(1.5 - i / (n - 1)) / n for i in range(n)], dtype=torch.float64)
        assert torch.allclose(pre, want, atol=1e-7)
    # random large logits and gates at the edge: rows exact, columns = the reported error
    layer = HyperConnections(atoms.Linear(C, C), streams=n)
    with torch.no_grad():
        layer.static.weight.add_(torch.randn(layer.static.weight.shape, generator=torch.Generator().manual_seed(n)) * 5)
    with layer.recording() as rec:
        layer(torch.randn(16, n, C) * 3)
    H = rec["h_res"]
    assert (H >= 0).all() and (H.sum(-1) - 1).abs().max().item() <= 3e-7
    assert abs((H.sum(-2) - 1).abs().max().item() - rec["marginal_error"]) <= 3e-7
    for constrained in (True, False):
        if n == 1:
            one = HyperConnections(atoms.Linear(C, C), streams=1, constrained=constrained).double()
            x = torch.randn(4, 1, C, dtype=torch.float64)
            with torch.no_grad():
                one.gate.weight.zero_()
                assert torch.equal(one(x), x + one.branch(x))


# --------------------------------------------------------------------------------------------
# Triton under the interpreter (-m triton)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def _interpreted_triton(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("run with TRITON_INTERPRET=1 (as tests/test_kernels_triton.py sets before importing triton)")
    pytest.importorskip("triton")
    monkeypatch.setenv("MODULA_MHC_KERNELS", "triton")


@pytest.mark.triton
@pytest.mark.slow  # ~8 s under the interpreter (make test-slow; compiled on a GPU: -m triton)
def test_triton_mixing_kernels_match_float64_autograd(_interpreted_triton):
    """The Triton mixing kernels against float64 autograd on a rotated grid (measured worst: fp32
    2.6e-7, bf16 7.7e-3, fp16 4.9e-4)."""
    worst = {}
    for fn, naive, inputs, dt, needs, kind in _mixing_cases([17], [1, 3, 8], [1, 65],
                                                            [torch.float32, torch.bfloat16, torch.float16]):
        worst[dt] = max(worst.get(dt, 0.0), _check_mixing(fn, naive, inputs, dt, needs, kind))
    for dt, e in worst.items():
        assert e <= _MIX_TOL[dt], (dt, e)


@pytest.mark.triton
def test_triton_sinkhorn_flags_overflowing_logits_and_err_never_hides_nan(_interpreted_triton):
    """Defect: finite logits whose row spread overflows float32 made the Triton kernel return NaN
    with err = 0 (its max reduction dropped the NaN). The kernel now shifts each row by its max
    (no iterate changes) and flags a matrix whose row spread exceeds 2.1e37 NaN, as it does for
    non-finite logits; err is NaN whenever P holds a NaN. Other matrices are untouched."""
    L = torch.randn(5, 2, 2) * 3
    L[1] = torch.tensor([[3e38, -3e38], [3e38, -3e38]])
    L[3, 0] = torch.tensor([2e38, -2e38])
    for dtype in (torch.float32, torch.bfloat16):
        Lg = L.to(dtype).detach().clone().requires_grad_()
        P, err = K.sinkhorn(Lg, iters=7, return_error=True)
        bad = torch.tensor([False, True, False, True, False])
        assert P[bad].isnan().all() and not P[~bad].isnan().any() and err.isnan()
        P.sum().backward()
        assert Lg.grad[bad].isnan().all() and not Lg.grad[~bad].isnan().any()
        ok = L[~bad].to(dtype).double()
        assert torch.allclose(P[~bad].double(), _unrolled(ok, 7), atol=1e-6 if dtype == torch.float32 else 4e-3)
    # a huge common offset with a moderate spread is fine (the row shift keeps the scalings small)
    L = torch.full((3, 4, 4), 3e38) - torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 50
    P = K.sinkhorn(L, iters=20)
    assert torch.isfinite(P).all()


@pytest.mark.triton
def test_triton_sinkhorn_extreme_logits_match_float64(_interpreted_triton):
    """±1e4, one huge entry, std 40, ragged n and batches against float64 autograd."""
    g = torch.Generator().manual_seed(0)
    # at ±1e4 logits float32 rounds the exponent L + u + v to ulp(1e4) ≈ 1e-3: P off by 3.6e-4 measured
    cases = [(_EXTREME[c](g).float(), 1e-3 if c == "pm1e4" else 3e-6) for c in ("pm1e4", "one_huge", "std40", "n1", "n3_ragged_batch")]
    cases += [(torch.randn(b, n, n, generator=g) * 3, 3e-6) for n, b in ((2, 67), (5, 1), (16, 3))]
    for L, tol in cases:
        Lg = L.clone().requires_grad_()
        P, err = K.sinkhorn(Lg, iters=7, return_error=True)
        w = torch.randn(P.shape, generator=g)
        (P * w).sum().backward()
        L64 = L.double().requires_grad_()
        R = _unrolled(L64, 7)
        (R * w.double()).sum().backward()
        assert (P.double() - R).abs().max().item() <= tol
        assert (Lg.grad.double() - L64.grad).abs().max().item() <= tol * max(1.0, L64.grad.abs().max().item())
        assert abs(err.item() - _marginals(P)) <= 1e-6


@pytest.mark.triton
def test_triton_msign_empty_and_ragged(_interpreted_triton):
    for shape in [(5, 0), (0, 5), (2, 0, 3), (0, 4, 6)]:
        assert K.msign(torch.zeros(shape)).shape == shape
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 37), (37, 1), (19, 33), (2, 3, 17, 9)]:
        X = torch.randn(*shape, generator=g)
        from modula_mhc.kernels import reference as R
        assert torch.allclose(K.msign(X), R.msign(X), atol=2e-6, rtol=0)
