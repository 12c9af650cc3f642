"""Triton kernels against their PyTorch references, forward and backward (random grad_output).

Runs the kernels on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set here before
triton is imported) with MODULA_MHC_KERNELS=triton, on tiny shapes including sizes that do not
divide the block sizes. On a CUDA machine run with TRITON_INTERPRET=0 to check the compiled kernels on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed; the references still work")

import modula_mhc.kernels as K  # noqa: E402
from modula_mhc.kernels import reference as R  # noqa: E402
from modula_mhc.kernels import triton_mhc, triton_msign, triton_sinkhorn, triton_tuning  # noqa: E402

pytestmark = pytest.mark.triton

_INTERPRET = os.environ["TRITON_INTERPRET"] not in ("0", "")
# Interpreter: CPU tensors. TRITON_INTERPRET=0 on a CUDA machine: the compiled kernels on the GPU.
DEVICES = ["cpu"] if _INTERPRET else (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)


def _grads_vs_reference(f_triton, f_ref, inputs, seed=0):
    """Run both with the same random grad_output; return (max output diffs, max grad diffs, grad scales)."""
    torch.manual_seed(seed)
    a = [x.clone().requires_grad_() for x in inputs]
    b = [x.clone().requires_grad_() for x in inputs]
    oa, ob = f_triton(*a), f_ref(*b)
    oa = oa if isinstance(oa, tuple) else (oa,)
    ob = ob if isinstance(ob, tuple) else (ob,)
    gs = [torch.randn_like(o) for o in ob]
    sum((o * g).sum() for o, g in zip(oa, gs)).backward()
    sum((o * g).sum() for o, g in zip(ob, gs)).backward()
    out = [(x.float() - y.float()).abs().max().item() for x, y in zip(oa, ob)]
    grad = [(x.grad.float() - y.grad.float()).abs().max().item() for x, y in zip(a, b)]
    scale = [y.grad.float().abs().max().item() for y in b]
    return out, grad, scale


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MODULA_MHC_KERNELS", "triton")


def test_dispatch_picks_triton_when_forced():
    assert K.backend_for("sinkhorn", torch.zeros(3, 4, 4)) == "triton"
    assert K.backend_for("msign", torch.zeros(3, 4).bfloat16()) == "triton"
    assert K.backend_for("mhc_pre", torch.zeros(3, 4, 8), torch.zeros(3, 4)) == "triton"


def test_dispatch_falls_back_where_triton_does_not_support_the_input():
    """Forced Triton still runs the reference for float64, Sinkhorn's tol mode and n > 16: the
    dispatcher asks each module's supports(), and nothing else decides."""
    f64 = torch.zeros(3, 4, 4, dtype=torch.float64)
    assert K.backend_for("sinkhorn", f64) == "reference"
    assert K.backend_for("sinkhorn", torch.zeros(2, 17, 17)) == "reference"
    assert K.backend_for("sinkhorn", torch.zeros(2, 4, 4), tol=1e-5) == "reference"
    assert K.backend_for("msign", f64) == "reference"
    assert K.backend_for("mhc_coeff_input", f64.flatten(-2), torch.zeros(16, 24)) == "reference"
    assert K.backend_for("mhc_post_res", f64, f64[..., 0], f64, f64[..., 0]) == "reference"
    # the public functions take the same route: fp64 through the reference, exactly
    L = torch.randn(5, 4, 4, dtype=torch.float64)
    assert torch.equal(K.sinkhorn(L), R.sinkhorn(L))


def test_msign_preferred_only_where_measured_faster(monkeypatch):
    """Unless forced, the dispatcher runs Triton's msign only where ``preferred`` says it beat the
    reference on a GPU: large half-precision stacks, never float32 or 128-sized stacks."""
    assert triton_msign.preferred(torch.empty(48, 768, 768, device="meta", dtype=torch.bfloat16))
    assert triton_msign.preferred(torch.empty(24, 3072, 768, device="meta", dtype=torch.bfloat16))
    assert not triton_msign.preferred(torch.empty(16, 128, 128, device="meta", dtype=torch.bfloat16))
    assert not triton_msign.preferred(torch.empty(1, 1024, 1024, device="meta", dtype=torch.bfloat16))
    assert not triton_msign.preferred(torch.empty(1, 4096, 4096, device="meta"))
    from modula_mhc.kernels import dispatch
    monkeypatch.setattr(dispatch, "_on_gpu", lambda t: True)  # the auto rule, as on a CUDA machine
    monkeypatch.setenv("MODULA_MHC_KERNELS", "auto")
    assert K.backend_for("msign", torch.zeros(16, 128, 128)) == "reference"
    assert K.backend_for("msign", torch.empty(2, 4096, 4096, device="meta", dtype=torch.bfloat16)) == "triton"
    assert K.backend_for("sinkhorn", torch.zeros(3, 4, 4)) == "triton"  # no preferred(): supports decides
    monkeypatch.setenv("MODULA_MHC_KERNELS", "triton")  # forced: Triton wherever it is supported
    assert K.backend_for("msign", torch.zeros(16, 128, 128)) == "triton"


def test_supports_predicates():
    assert triton_sinkhorn.supports(torch.zeros(2, 16, 16)) and not triton_sinkhorn.supports(torch.zeros(2, 17, 17))
    assert triton_sinkhorn.supports(torch.zeros(4, 4).half())
    assert not triton_sinkhorn.supports(torch.zeros(2, 4, 4, dtype=torch.float64))
    assert not triton_sinkhorn.supports(torch.zeros(2, 4, 4), tol=1e-6)
    assert not triton_sinkhorn.supports(torch.zeros(2, 4, 3))
    assert triton_msign.supports(torch.zeros(3, 5)) and not triton_msign.supports(torch.zeros(3, 5, dtype=torch.float64))
    assert triton_mhc.supports(torch.zeros(2, 4, 8).bfloat16(), torch.zeros(2, 4))
    assert not triton_mhc.supports(torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,n,std,iters", [(37, 4, 2.0, 20), (5, 3, 0.5, 6), (70, 5, 4.0, 7), (3, 16, 2.0, 3),
                                           (9, 4, 40.0, 5), (65, 2, 1.0, 4)])
def test_sinkhorn_kernel_matches_reference(device, B, n, std, iters):
    torch.manual_seed(B * n)
    L = (torch.randn(B, n, n) * std).to(device)

    def f_triton(x):
        return triton_sinkhorn.sinkhorn(x, iters=iters, return_error=True)

    def f_ref(x):
        return R.sinkhorn(x, iters=iters, return_error=True)

    out, grad, scale = _grads_vs_reference(lambda x: f_triton(x)[0], lambda x: f_ref(x)[0], [L])
    assert out[0] < 2e-6
    assert grad[0] < 1e-5 * max(scale[0], 1.0)
    e_t, e_r = f_triton(L)[1].item(), f_ref(L)[1].item()
    assert abs(e_t - e_r) < 1e-5


def test_sinkhorn_kernel_public_dispatch_batched_and_n1():
    torch.manual_seed(1)
    L = torch.randn(2, 3, 4, 4, device=DEVICES[0])
    assert torch.allclose(K.sinkhorn(L), R.sinkhorn(L), atol=2e-6)
    P = K.sinkhorn(torch.randn(5, 1, 1, device=DEVICES[0]))
    assert (P == 1).all()
    # bf16 in, bf16 out, fp32 inside.
    Pb = K.sinkhorn(L.bfloat16())
    assert Pb.dtype == torch.bfloat16 and (Pb.float() - R.sinkhorn(L.bfloat16()).float()).abs().max() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sinkhorn_kernel_error_is_that_of_the_returned_matrix(device, dtype):
    """err is measured on P as stored: bf16 / fp16 rounding included (it was the fp32 registers'
    error, 8e-6 against a bf16 result off by 3e-3), fp32 as before (the reference's)."""
    torch.manual_seed(3)
    L = torch.randn(70, 5, 5, device=device).to(dtype)
    P, err = K.sinkhorn(L, iters=30, return_error=True)
    Pd = P.double()
    true = max((Pd.sum(-1) - 1).abs().max().item(), (Pd.sum(-2) - 1).abs().max().item())
    assert abs(err.item() - true) <= 1e-6
    _, err_ref = R.sinkhorn(L, iters=30, return_error=True)
    assert abs(err.item() - err_ref.item()) <= (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinkhorn_kernel_flags_non_finite_logits_with_nan(device, dtype):
    """No exception without a host sync: each matrix with a NaN or ±inf logit comes back all NaN,
    with a NaN gradient, and err is NaN; the other matrices match the reference (they used to be
    NaN only for NaN/+inf, with -inf silently taken as a zero weight, and err could drop the NaN)."""
    torch.manual_seed(4)
    L = torch.randn(70, 3, 3, device=device)
    L[3, 1, 2], L[5, 0, 0], L[69, 2, 2] = float("nan"), float("-inf"), float("inf")
    bad = torch.zeros(70, dtype=torch.bool, device=device)
    bad[[3, 5, 69]] = True
    Lg = L.to(dtype).requires_grad_()
    P, err = K.sinkhorn(Lg, return_error=True)
    assert err.isnan() and P[bad].isnan().all() and not P[~bad].isnan().any()
    assert torch.allclose(P[~bad].float(), R.sinkhorn(L[~bad].to(dtype)).float(), atol=1e-3)
    P.backward(torch.randn_like(P))
    assert Lg.grad[bad].isnan().all() and torch.isfinite(Lg.grad[~bad]).all()
    with pytest.raises(ValueError, match="n >= 1"):  # n = 0: not the kernel's, a clear error
        K.sinkhorn(torch.zeros(2, 0, 0, device=device))


# ---------------------------------------------------------------------------- msign


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 37, 45), (1, 70, 20), (3, 16, 16)])
def test_sym_product_matches_matmul(device, shape):
    torch.manual_seed(2)
    X = torch.randn(*shape, device=device)
    assert torch.allclose(triton_msign.sym_product(X), X @ X.mT, atol=1e-4)
    C = torch.randn(shape[0], shape[1], shape[1], device=device)
    C = C + C.mT
    got = triton_msign.sym_product(X, alpha=0.5, C=C, beta=-2.0)
    assert torch.allclose(got, 0.5 * X @ X.mT - 2.0 * C, atol=1e-4)
    Xb = X.bfloat16()
    Sb = triton_msign.sym_product(Xb)
    want = Xb.float() @ Xb.float().mT
    assert Sb.dtype == torch.bfloat16
    assert ((Sb.float() - want).abs() / want.abs().amax()).max() < 1e-2  # bf16 output rounding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(20, 33), (33, 20), (2, 17, 40)])
def test_msign_kernel_matches_reference(device, shape):
    torch.manual_seed(3)
    X = torch.randn(*shape, device=device)
    Y = K.msign(X)
    assert torch.allclose(Y, R.msign(X), atol=1e-5)
    Yb = K.msign(X.bfloat16())
    assert Yb.dtype == torch.bfloat16
    s = torch.linalg.svdvals(Yb.float().cpu())
    assert (s - 1).abs().max() < 3e-2
    assert (K.msign(torch.zeros(3, 5, device=device)) == 0).all()


# ---------------------------------------------------------------------------- mHC mixing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,n,C,m", [(19, 4, 37, 24), (5, 3, 70, 15), (33, 1, 20, 3)])
def test_coeff_input_kernel(device, M, n, C, m):
    torch.manual_seed(4)
    x, phi = torch.randn(M, n * C, device=device), torch.randn(n * C, m, device=device)
    out, grad, scale = _grads_vs_reference(triton_mhc.mhc_coeff_input, R.mhc_coeff_input, [x, phi])
    assert out[0] < 1e-4 and out[1] < 1e-4
    assert grad[0] < 1e-5 * scale[0] and grad[1] < 1e-5 * scale[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,n,C", [((19,), 4, 37), ((2, 5), 3, 70), ((7,), 1, 5)])
def test_pre_kernel(device, lead, n, C):
    torch.manual_seed(5)
    x, h = torch.randn(*lead, n, C, device=device), torch.randn(*lead, n, device=device)
    out, grad, scale = _grads_vs_reference(triton_mhc.mhc_pre, R.mhc_pre, [x, h])
    assert out[0] < 1e-5
    assert all(g < 1e-5 * max(s, 1.0) for g, s in zip(grad, scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,n,C", [((19,), 4, 37), ((2, 5), 3, 70), ((7,), 1, 5)])
def test_post_res_kernel_orientation_and_grads(device, lead, n, C):
    torch.manual_seed(6)
    x, f = torch.randn(*lead, n, C, device=device), torch.randn(*lead, C, device=device)
    H, hp = torch.randn(*lead, n, n, device=device), torch.randn(*lead, n, device=device)
    out, grad, scale = _grads_vs_reference(triton_mhc.mhc_post_res, R.mhc_post_res, [x, f, H, hp])
    assert out[0] < 1e-5
    assert all(g < 1e-5 * max(s, 1.0) for g, s in zip(grad, scale))
    # Orientation against a hand loop: out_i = Σ_j H[i, j] x_j + h_post_i f.
    got = K.mhc_post_res(x, f, H, hp)
    want = torch.stack([sum(H[..., i, j, None] * x[..., j, :] for j in range(n)) + hp[..., i, None] * f
                        for i in range(n)], dim=-2)
    assert torch.allclose(got, want, atol=1e-5)


def test_mixing_kernels_bf16_activations():
    torch.manual_seed(7)
    d = DEVICES[0]
    x, f = torch.randn(9, 4, 40, device=d).bfloat16(), torch.randn(9, 40, device=d).bfloat16()
    H, hp, hpre = torch.rand(9, 4, 4, device=d), torch.rand(9, 4, device=d), torch.rand(9, 4, device=d)
    y = K.mhc_post_res(x, f, H, hp)
    assert y.dtype == torch.bfloat16
    assert (y.float() - R.mhc_post_res(x.float(), f.float(), H, hp)).abs().max() < 5e-2
    z = K.mhc_pre(x, hpre)
    assert z.dtype == torch.bfloat16
    assert (z.float() - R.mhc_pre(x.float(), hpre)).abs().max() < 5e-2


# ---------------------------------------------------------------------------- tile candidates


def _tuned_kernels():
    return [t for module in (triton_msign, triton_mhc) for t in vars(module).values() if isinstance(t, triton_tuning.Tiled)]


def test_every_kernel_ships_its_tiles_as_first_candidate():
    """On a GPU the tuner chooses among the candidates; the shipped tiles are always one of them
    (so tuning can only pick a configuration measured at least as fast)."""
    kernels = _tuned_kernels()
    assert len(kernels) == 8  # the symmetric product and the seven mixing kernels
    for t in kernels:
        assert t.configs[0].kwargs == t.fixed and len(t.configs) >= 6
        assert len({(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in t.configs}) == len(t.configs)


def test_autotune_switch(monkeypatch):
    """MODULA_MHC_AUTOTUNE=0 keeps the shipped tiles on a GPU (bitwise-repeatable runs): with the
    interpreter check bypassed, the tuner must not be reached; a bad value is an error."""
    for value, on in [("0", False), ("off", False), ("1", True), ("", True), ("yes", True)]:
        monkeypatch.setenv("MODULA_MHC_AUTOTUNE", value)
        assert triton_tuning.autotuning() is on
    monkeypatch.setenv("MODULA_MHC_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="MODULA_MHC_AUTOTUNE"):
        triton_tuning.autotuning()
    if not _INTERPRET:
        return
    monkeypatch.setenv("MODULA_MHC_AUTOTUNE", "0")
    monkeypatch.setattr(triton_tuning, "interpreting", lambda: False)  # as on a GPU

    class NoTuner:
        def __getitem__(self, grid):
            raise AssertionError("the tuner ran with MODULA_MHC_AUTOTUNE=0")
    monkeypatch.setattr(triton_msign._SYRK, "_tuned", NoTuner())
    X = torch.randn(2, 37, 45)
    assert torch.allclose(triton_msign.sym_product(X), X @ X.mT, atol=1e-4)
    monkeypatch.setenv("MODULA_MHC_AUTOTUNE", "1")
    with pytest.raises(AssertionError, match="tuner ran"):
        triton_msign.sym_product(X)


@pytest.mark.skipif(not _INTERPRET, reason="forces each candidate through the interpreter")
def test_every_tile_candidate_matches_the_reference():
    """Each autotuning candidate of every kernel, forced in turn, computes what the reference does
    (outputs and gradients) on shapes that divide none of the tile sizes."""
    count = max(len(t.configs) for t in _tuned_kernels())
    torch.manual_seed(9)
    x, phi = torch.randn(19, 3 * 37), torch.randn(3 * 37, 15)
    xs, h, f = torch.randn(19, 3, 37), torch.randn(19, 3), torch.randn(19, 37)
    H, hp = torch.randn(19, 3, 3), torch.randn(19, 3)
    X = torch.randn(2, 37, 45)
    for i in range(count):
        with triton_tuning.force_config(i):
            out, grad, scale = _grads_vs_reference(triton_mhc.mhc_coeff_input, R.mhc_coeff_input, [x, phi])
            assert max(out) < 1e-4 and all(g < 1e-5 * s for g, s in zip(grad, scale)), i
            out, grad, scale = _grads_vs_reference(triton_mhc.mhc_pre, R.mhc_pre, [xs, h])
            assert out[0] < 1e-5 and all(g < 1e-5 * max(s, 1.0) for g, s in zip(grad, scale)), i
            out, grad, scale = _grads_vs_reference(triton_mhc.mhc_post_res, R.mhc_post_res, [xs, f, H, hp])
            assert out[0] < 1e-5 and all(g < 1e-5 * max(s, 1.0) for g, s in zip(grad, scale)), i
            assert torch.allclose(triton_msign.sym_product(X), X @ X.mT, atol=1e-4), i


# ---------------------------------------------------------------------------- full size (GPU only)

#: the benchmarks' GPU sizes; under the interpreter these would take hours, so they run only compiled
FULL_SIZE = [] if _INTERPRET else ["cuda"]


def _rel(x, y):
    return float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("device", FULL_SIZE)
def test_full_size_kernels_match_reference(device):
    """The compiled kernels at the benchmark sizes (GPT-2 small and up): every output and gradient
    within a relative 1e-3 of the PyTorch reference (fp32 accumulation over up to 8192 terms)."""
    torch.manual_seed(8)
    L = torch.randn(8192, 4, 4, device=device) * 2
    out, grad, scale = _grads_vs_reference(lambda x: triton_sinkhorn.sinkhorn(x, iters=20), lambda x: R.sinkhorn(x, iters=20), [L])
    assert out[0] < 1e-5 and grad[0] < 1e-4 * max(scale[0], 1.0)
    for shape in [(768, 768), (768, 3072), (2048, 8192)]:
        X = torch.randn(*shape, device=device)
        assert _rel(K.msign(X), R.msign(X)) < 1e-3, shape
    T, n, C = 8192, 4, 1024
    x, phi = torch.randn(T, n * C, device=device), torch.randn(n * C, 24, device=device) / 64
    out, grad, scale = _grads_vs_reference(triton_mhc.mhc_coeff_input, R.mhc_coeff_input, [x, phi])
    assert all(g < 1e-3 * s for g, s in zip(grad, scale))
    xs, f = torch.randn(T, n, C, device=device), torch.randn(T, C, device=device)
    H, hp, hpre = torch.rand(T, n, n, device=device), torch.rand(T, n, device=device), torch.rand(T, n, device=device)
    out, grad, scale = _grads_vs_reference(triton_mhc.mhc_post_res, R.mhc_post_res, [xs, f, H, hp])
    assert all(g < 1e-3 * max(s, 1.0) for g, s in zip(grad, scale))
    out, grad, scale = _grads_vs_reference(triton_mhc.mhc_pre, R.mhc_pre, [xs, hpre])
    assert all(g < 1e-3 * max(s, 1.0) for g, s in zip(grad, scale))
