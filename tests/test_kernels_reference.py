"""PyTorch references of the kernels: msign quality, Sinkhorn marginals and exact backward, mixing."""

import math

import pytest
import torch

import modula_mhc.kernels as K
from modula_mhc.kernels import reference as R
from modula_mhc.kernels import sinkhorn_reference


def _svals(Y):
    return torch.linalg.svdvals(Y.double())


# ---------------------------------------------------------------------------- msign


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 48, 96), (2, 2, 96, 40)])
def test_msign_fp32_singular_values_near_one(shape):
    torch.manual_seed(0)
    Y = K.msign(torch.randn(*shape))
    assert Y.dtype == torch.float32 and Y.shape == shape
    s = _svals(Y)
    # Rectangular Gaussians are well inside Polar Express's range: fp32 rounding is the limit.
    assert (s - 1).abs().max() < 1e-4


def test_msign_bf16_singular_values_near_one():
    torch.manual_seed(1)
    Y = K.msign(torch.randn(4, 64, 160).bfloat16())
    assert Y.dtype == torch.bfloat16
    s = _svals(Y.float())
    assert (s - 1).abs().max() < 2e-2  # measured ≈ 5e-3: bf16 rounding of the iterates


def test_msign_matches_svd_polar_factor():
    torch.manual_seed(2)
    X = torch.randn(40, 24, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    assert (K.msign(X.float()).double() - U @ Vh).abs().max() < 1e-4
    assert (K.msign(X) - U @ Vh).abs().max() < 1e-6


def test_msign_square_small_singular_values_stated_limit():
    # Square Gaussians: σ_min/‖X‖_F ≈ n^-1.5 can fall below Polar Express's design range; the
    # docstring says their smallest singular values may stay below 1 but never exceed it by much.
    torch.manual_seed(3)
    s = _svals(K.msign(torch.randn(256, 256)))
    assert s.max() < 1 + 1e-3
    assert (s > 0.9).float().mean() > 0.95


def test_msign_transpose_equivariant_and_batched_like_loop():
    torch.manual_seed(4)
    X = torch.randn(3, 20, 33)
    Y = K.msign(X)
    assert torch.allclose(K.msign(X.mT), Y.mT, atol=1e-6)
    for b in range(3):
        assert torch.allclose(K.msign(X[b]), Y[b], atol=1e-6)


def test_msign_zero_gives_zero_never_nan():
    for dt in (torch.float32, torch.bfloat16):
        X = torch.zeros(2, 5, 7, dtype=dt)
        X[1] = torch.randn(5, 7).to(dt)
        Y = K.msign(X)
        assert torch.isfinite(Y.float()).all()
        assert (Y[0] == 0).all()
        assert (_svals(Y[1].float()) - 1).abs().max() < 2e-2


def test_msign_bad_input_raises():
    with pytest.raises(ValueError):
        K.msign(torch.randn(5))
    with pytest.raises(TypeError):
        K.msign(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError):
        K.msign(torch.randn(3, 3), steps=0)


@pytest.mark.parametrize("kind", ["gauss", "flat", "rank1", "spike+floor", "cond1e6"])
@pytest.mark.parametrize("shape", [(40, 40), (30, 200)])
def test_msign_tight_start_bounds_sigma_and_saves_a_step(kind, shape):
    """msign's start scales by 1.01·‖XXᵀ‖_F^{1/2} ≥ 1.01·σ_max: σ_max ≤ 1/1.01 whatever the
    spectrum, and σ_max sits far closer to 1 than after ‖X‖_F alone, so 6 steps (Polar Express
    steps 2-7) match the polar factor as 7 plain steps do."""
    n, m = shape
    g = torch.Generator().manual_seed(11)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    i = torch.arange(n, dtype=torch.float64)
    sv = {"gauss": None, "flat": torch.ones(n, dtype=torch.float64), "rank1": (i < 1).double(),
          "spike+floor": torch.where(i < 1, 1.0, 5e-3), "cond1e6": 10 ** (-6 * i / (n - 1))}[kind]
    X = torch.randn(n, m, generator=g) if sv is None else ((U * sv) @ V.mT).float()
    Y, S = R.msign_start(X.unsqueeze(0))
    top = float(torch.linalg.matrix_norm(Y[0].double(), ord=2))
    assert top <= 1 / 1.01 * (1 + 1e-5)
    assert top >= float(torch.linalg.matrix_norm(R.msign_normalise(X).double(), ord=2)) * (1 - 1e-6)
    assert torch.allclose(S, Y @ Y.mT, atol=1e-6)
    A = R.msign(X, 6).double()
    s = torch.linalg.svdvals(A)
    assert s.max() <= 1 + 1e-5
    nuc = torch.linalg.svdvals(X.double()).sum()
    assert float((A * X.double()).sum() / nuc) >= 0.995
    assert R.polar_express_gain(6) <= 1.0 < R.polar_express_gain(5)
    assert R.msign_coeffs(6) == R.polar_express_coeffs(7)[1:]


def test_msign_six_steps_land_within_2e_5_of_one_over_the_design_range():
    """The stated constants, in exact arithmetic over a dense grid. After the tight start every σ in
    step 2's design range [p₁(1e-3/1.01), 1/1.01] maps into [1 − 2e-5, 1] in 6 steps. ‖A‖₂ is set by
    σ_max ≥ rank^(-1/4)/1.01 (≥ 0.03 up to rank 1e6): there 6 steps give 1 to 2e-5 and 5 steps,
    divided by their gain, stay within 0.4%."""
    a, b, c = R.polar_express_coeffs(1)[0]
    lo = 1e-3 / 1.01
    lo = lo * (a + lo * lo * (b + c * lo * lo))
    x = torch.logspace(math.log10(lo), math.log10(1 / 1.01), 400001, dtype=torch.float64)
    for steps, floor, top_floor in ((6, 1 - 2e-5, 1 - 2e-5), (5, None, 1 - 4e-3)):
        y = x.clone()
        for a, b, c in R.msign_coeffs(steps):
            y = y * (a + y * y * (b + c * y * y))
        y = y / max(R.polar_express_gain(steps), 1.0)
        assert float(y.max()) <= 1.0 + 1e-9, steps  # the gain is a grid maximum too
        if floor is not None:
            assert float(y.min()) >= floor, (steps, float(y.min()))
        assert float(y[x >= 0.03].min()) >= top_floor, (steps, float(y[x >= 0.03].min()))


def test_polar_express_coefficients_safety_scaling():
    c = R.polar_express_coeffs(10)
    assert len(c) == 10 and c[7] == c[8] == c[9] == (1.875, -1.25, 0.375)
    a0, b0, c0 = c[0]
    assert abs(a0 * 1.01 - 8.28721201814563) < 1e-12
    assert abs(b0 * 1.01**3 + 23.595886519098837) < 1e-12
    assert abs(c0 * 1.01**5 - 17.300387312530933) < 1e-12


# ---------------------------------------------------------------------------- Sinkhorn


def _unrolled(L, iters):
    """Plain autograd through the alternating row / column normalisation of exp(L)."""
    P = torch.softmax(L, dim=-1)
    P = P / P.sum(-2, keepdim=True)
    for _ in range(iters - 1):
        P = P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
    return P


def _marginals(P):
    P = P.double()
    return max((P.sum(-1) - 1).abs().max().item(), (P.sum(-2) - 1).abs().max().item())


@pytest.mark.parametrize("std,bound", [(0.5, 1e-5), (1.0, 1e-3)])
def test_sinkhorn_marginals_small_logits(std, bound):
    torch.manual_seed(0)
    P, err = K.sinkhorn(torch.randn(4096, 4, 4) * std, iters=20, return_error=True)
    assert _marginals(P) < bound
    assert abs(err.item() - _marginals(P)) < 1e-6


@pytest.mark.parametrize("std", [2.0, 4.0, 8.0])
def test_sinkhorn_large_logits_match_float64_and_report_error(std):
    # Twenty iterations are not converged here (measured worst marginal error ~2e-2 / 6e-2 / 0.1);
    # the claim is that the fp32 result equals the float64 unrolled iteration and err is honest.
    torch.manual_seed(1)
    L = torch.randn(4096, 4, 4) * std
    P, err = K.sinkhorn(L, iters=20, return_error=True)
    P64 = _unrolled(L.double(), 20)
    assert (P.double() - P64).abs().max() < 1e-5
    assert abs(err.item() - _marginals(P64)) < 1e-5
    assert _marginals(P64) > 1e-3  # really not converged: the tol mode below is needed


@pytest.mark.parametrize("std,tol", [(2.0, 1e-5), (1.0, 1e-6)])
def test_sinkhorn_tol_mode_reaches_tol(std, tol):
    torch.manual_seed(2)
    P, err = K.sinkhorn(torch.randn(512, 4, 4) * std, tol=tol, max_iters=5000, return_error=True)
    assert err.item() < tol
    assert _marginals(P) < tol


def test_sinkhorn_tol_mode_cap_reports_true_error():
    torch.manual_seed(3)
    # tol 1e-6 (1e-7 is now below the float32 floor and refused; the cap now also warns)
    with pytest.warns(K.SinkhornConvergenceWarning):
        P, err = K.sinkhorn(torch.randn(512, 4, 4) * 8, tol=1e-6, max_iters=30, return_error=True)
    assert abs(err.item() - _marginals(P)) < 1e-6 and err.item() > 1e-6


@pytest.mark.parametrize("keep", [True, False], ids=["kept-iterates", "recomputed-iterates"])
@pytest.mark.parametrize("std", [0.5, 2.0, 4.0, 8.0, 40.0])
def test_sinkhorn_backward_matches_float64_unrolled_autograd(std, keep, monkeypatch):
    # std 40 exercises the log-domain path (row spread > 60); keep=False forces the backward to
    # recompute the iterates from the logits (what batches above _KEEP_STATES_BYTES do)
    if not keep:
        monkeypatch.setattr(sinkhorn_reference, "_KEEP_STATES_BYTES", 0)
    torch.manual_seed(4)
    L = torch.randn(2, 300, 4, 4) * std
    G = torch.randn(2, 300, 4, 4)  # random grad_output: all-ones gives zero gradient
    L64 = L.double().requires_grad_()
    (_unrolled(L64, 20) * G.double()).sum().backward()
    L32 = L.clone().requires_grad_()
    (K.sinkhorn(L32, iters=20) * G).sum().backward()
    rel = (L32.grad.double() - L64.grad).norm() / L64.grad.norm()
    assert L64.grad.norm() > 1e-3
    assert rel < 1e-5  # measured 1.1e-7 .. 6.7e-7


@pytest.mark.parametrize("n,iters", [(2, 1), (5, 7), (16, 20)])
def test_sinkhorn_backward_other_sizes(n, iters):
    torch.manual_seed(5)
    L = torch.randn(64, n, n) * 2
    G = torch.randn(64, n, n)
    L64 = L.double().requires_grad_()
    (_unrolled(L64, iters) * G.double()).sum().backward()
    L32 = L.clone().requires_grad_()
    (K.sinkhorn(L32, iters=iters) * G).sum().backward()
    assert (L32.grad.double() - L64.grad).norm() / L64.grad.norm() < 1e-5


def test_sinkhorn_gradcheck_float64_fixed_and_tol_modes():
    torch.manual_seed(6)
    L = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: K.sinkhorn(x, iters=7), (L,))
    assert torch.autograd.gradcheck(lambda x: K.sinkhorn(x * 30, iters=5), (L,))  # log domain
    assert torch.autograd.gradcheck(lambda x: K.sinkhorn(x, tol=1e-9), (L,))


def test_sinkhorn_chunked_backward_equals_unchunked(monkeypatch):
    torch.manual_seed(7)
    L = torch.randn(100, 4, 4)
    G = torch.randn(100, 4, 4)
    L1 = L.clone().requires_grad_()
    (K.sinkhorn(L1) * G).sum().backward()  # iterates kept by the forward
    monkeypatch.setattr(sinkhorn_reference, "_KEEP_STATES_BYTES", 0)  # recomputed in the backward...
    monkeypatch.setattr(sinkhorn_reference, "_BACKWARD_CHUNK_BYTES", 2 * 20 * 16 * 4 * 7)  # ...7 matrices per chunk
    L2 = L.clone().requires_grad_()
    (K.sinkhorn(L2) * G).sum().backward()
    assert torch.allclose(L1.grad, L2.grad, atol=1e-7)


def test_sinkhorn_n1_is_exactly_one():
    L = torch.randn(7, 1, 1, requires_grad=True)
    P = K.sinkhorn(L)
    assert (P == 1).all()
    (P * torch.randn_like(P)).sum().backward()
    assert (L.grad == 0).all()


def test_sinkhorn_dtypes_and_leading_dims():
    torch.manual_seed(8)
    L = torch.randn(2, 3, 4, 4)
    P = K.sinkhorn(L)
    for a in range(2):
        for b in range(3):
            assert torch.allclose(P[a, b], K.sinkhorn(L[a, b]), atol=1e-7)
    for dt in (torch.bfloat16, torch.float16):
        Pd = K.sinkhorn(L.to(dt))
        assert Pd.dtype == dt
        assert (Pd.float() - K.sinkhorn(L.to(dt).float())).abs().max() < 1e-2
    P64 = K.sinkhorn(L.double())
    assert P64.dtype == torch.float64
    assert (P64 - _unrolled(L.double(), 20)).abs().max() < 1e-12


def test_sinkhorn_bad_input_raises():
    with pytest.raises(ValueError):
        K.sinkhorn(torch.randn(3, 4))
    with pytest.raises(ValueError):
        K.sinkhorn(torch.randn(3, 3), iters=0)
    with pytest.raises(ValueError):
        K.sinkhorn(torch.randn(3, 3), tol=-1.0)
    with pytest.raises(ValueError):
        K.sinkhorn(torch.tensor([[0.0, float("inf")], [0.0, 0.0]]))
    with pytest.raises(TypeError):
        K.sinkhorn(torch.ones(3, 3, dtype=torch.int32))


def test_sinkhorn_project_is_doubly_stochastic_and_equals_sinkhorn_of_log():
    torch.manual_seed(9)
    W = torch.rand(6, 5, 5) + 0.05
    P, err = K.sinkhorn_project(W, return_error=True)
    assert err.item() < 1e-5 and _marginals(P) < 1e-5
    assert torch.allclose(K.sinkhorn_project(W, tol=None, iters=20), K.sinkhorn(W.log(), iters=20))
    # Already doubly stochastic → unchanged.
    D = torch.full((4, 4), 0.25)
    assert torch.allclose(K.sinkhorn_project(D), D, atol=1e-7)
    with pytest.raises(ValueError):
        K.sinkhorn_project(torch.zeros(3, 3))


# ---------------------------------------------------------------------------- mHC mixing


def test_mhc_pre_matches_stream_loop():
    torch.manual_seed(10)
    x, h = torch.randn(5, 3, 4, 7), torch.randn(5, 3, 4)
    want = sum(h[..., i, None] * x[..., i, :] for i in range(4))
    assert torch.allclose(K.mhc_pre(x, h), want, atol=1e-6)


def test_mhc_post_res_orientation_matches_hand_loop():
    torch.manual_seed(11)
    x, f = torch.randn(6, 4, 9), torch.randn(6, 9)
    H = torch.randn(6, 4, 4)  # deliberately non-symmetric: H and Hᵀ give different answers
    hp = torch.randn(6, 4)
    want = torch.zeros(6, 4, 9)
    for t in range(6):
        for i in range(4):
            want[t, i] = hp[t, i] * f[t]
            for j in range(4):
                want[t, i] += H[t, i, j] * x[t, j]  # weight of input j in output i
    out = K.mhc_post_res(x, f, H, hp)
    assert torch.allclose(out, want, atol=1e-5)
    assert not torch.allclose(K.mhc_post_res(x, f, H.mT, hp), want, atol=1e-2)


def test_mhc_coeff_input_fp32_product_and_sum_of_squares():
    torch.manual_seed(12)
    x, phi = torch.randn(3, 5, 32).bfloat16(), torch.randn(32, 24)
    h, ss = K.mhc_coeff_input(x, phi)
    assert h.dtype == ss.dtype == torch.float32
    assert torch.allclose(h.double(), x.double() @ phi.double(), atol=1e-4)
    assert torch.allclose(ss.double(), (x.double() ** 2).sum(-1), atol=1e-4)


def test_mixing_backwards_are_exact_float64():
    """The hand-written adjoints against finite differences, every input at once."""
    torch.manual_seed(13)
    d = dict(dtype=torch.float64, requires_grad=True)
    x, f = torch.randn(2, 3, 4, 5, **d), torch.randn(2, 3, 5, **d)
    H, hp, hq = torch.randn(2, 3, 4, 4, **d), torch.randn(2, 3, 4, **d), torch.randn(2, 3, 4, **d)
    phi = torch.randn(20, 6, **d)
    assert torch.autograd.gradcheck(K.mhc_pre, (x, hp))
    assert torch.autograd.gradcheck(K.mhc_post_res, (x, f, H, hq))
    assert torch.autograd.gradcheck(K.mhc_coeff_input, (x.flatten(-2), phi))
    # a stream tensor expanded from one copy (the first layer after ExpandStreams) and fp64 results
    x1 = torch.randn(2, 1, 5, **d)
    assert torch.autograd.gradcheck(lambda x1, h: K.mhc_pre(x1.expand(2, 4, 5), h), (x1, hp[0, :2]))
    assert torch.autograd.gradcheck(lambda x1, p: K.mhc_coeff_input(x1.expand(2, 4, 5).flatten(-2), p), (x1, phi))
    assert K.mhc_coeff_input(x.flatten(-2), phi)[0].dtype == torch.float64


def test_mixing_shape_errors():
    with pytest.raises(ValueError):
        K.mhc_pre(torch.randn(2, 4, 3), torch.randn(2, 3))
    with pytest.raises(ValueError):
        K.mhc_post_res(torch.randn(2, 4, 3), torch.randn(2, 3), torch.randn(2, 4, 3), torch.randn(2, 4))
    with pytest.raises(ValueError):
        K.mhc_coeff_input(torch.randn(2, 8), torch.randn(7, 3))


def test_mixing_kernels_refuse_integer_and_bool_tensors():
    """They compute in the inputs' dtype: an int64 x with h_pre = 0.25 used to give zeros."""
    x, xb = torch.arange(24).reshape(2, 4, 3), torch.ones(2, 4, 3, dtype=torch.bool)
    h, H = torch.full((2, 4), 0.25), torch.full((2, 4, 4), 0.25)
    calls = {"mhc_pre": [lambda: K.mhc_pre(x, h), lambda: K.mhc_pre(xb, h), lambda: K.mhc_pre(x.float(), h.long())],
             "mhc_post_res": [lambda: K.mhc_post_res(x, torch.ones(2, 3), H, h),
                              lambda: K.mhc_post_res(x.float(), torch.ones(2, 3, dtype=torch.int32), H, h)],
             "mhc_coeff_input": [lambda: K.mhc_coeff_input(x.flatten(-2), torch.ones(12, 2))],
             "mhc_layer": [lambda: K.mhc_layer(x, lambda u: u, lambda raw, ss: (h, h, H))]}
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=f"{name}: expected a floating-point"):
                fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["none", "frozen", "trained"])
def test_mhc_layer_backward_with_coefficients_that_need_no_gradient(dtype, weights):
    """With the defaults (phi=None, weights=()) or frozen coefficient weights nothing in the
    coefficient map wants a gradient; x and the branch still get theirs (before: RuntimeError
    "inputs argument to grad() cannot be empty"). Outputs that depend on no weight (h_post, h_res
    here) are fine next to one that does ("trained"; before: "element 1 of tensors does not require grad")."""
    n, C = 4, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = torch.randn(C, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.full((1,), 0.1, dtype=dtype, requires_grad=weights == "trained")
    const = dict(dtype=dtype)
    coeffs = lambda raw, sumsq, *ws: (torch.full((n,), 1.0 / n, **const) + sum(ws), torch.ones(n, **const),
                                      torch.eye(n, **const))
    out = K.mhc_layer(x, lambda u: u @ W, coeffs, None, () if weights == "none" else (w,))
    out.square().sum().backward()
    xr, Wr, wr = (t.detach().requires_grad_() for t in (x, W, w))
    p = 1.0 / n + (0 if weights == "none" else wr)  # h_post = 1, H_res = I: out_i = x_i + F(Σ_j p x_j)
    (xr + ((p * xr).sum(-2) @ Wr).unsqueeze(-2)).square().sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    for got, want in [(x.grad, xr.grad), (W.grad, Wr.grad)] + ([(w.grad, wr.grad)] if weights == "trained" else []):
        torch.testing.assert_close(got, want, **tol)
    assert (w.grad is None) == (weights != "trained")


# ---------------------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch):
    t = torch.zeros(2, 4, 4)
    monkeypatch.delenv("MODULA_MHC_KERNELS", raising=False)
    assert K.backend_for("sinkhorn", t) == "reference"  # CPU tensor
    monkeypatch.setenv("MODULA_MHC_KERNELS", "reference")
    assert K.backend_for("sinkhorn", t) == "reference"
    monkeypatch.setenv("MODULA_MHC_KERNELS", "bogus")
    with pytest.raises(ValueError):
        K.backend_for("sinkhorn", t)
    monkeypatch.delenv("MODULA_MHC_KERNELS")
    with pytest.raises(ValueError, match="unknown kernel"):
        K.backend_for("softmax", t)
    if K.triton_available():
        monkeypatch.setenv("MODULA_MHC_KERNELS", "triton")  # asked for; float64 still takes the reference
        assert K.backend_for("sinkhorn", t.double()) == "reference"
