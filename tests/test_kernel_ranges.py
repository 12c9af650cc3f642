"""Kernels at the edges of their input range: msign of tiny/huge matrices and its stated accuracy at 6
steps; Sinkhorn's reported error for half-precision results, non-finite / overflowing logits, n = 0."""
import warnings

import pytest
import torch

import modula_mhc.kernels as K
from modula_mhc.kernels import reference as R
from modula_mhc.kernels import sinkhorn_reference as SR
from modula_mhc.manifolds.euclidean import Euclidean

# ---------------------------------------------------------------------------- msign


def _svals(A):
    return torch.linalg.svdvals(A.double())


@pytest.mark.parametrize("dtype,scales", [
    (torch.float32, (1e-30, 1e-20, 1e-12, 1e12, 1e18, 1e30)),
    (torch.float64, (1e-300, 1e-150, 1e-20, 1e20, 1e155, 1e300)),
])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_msign_is_scale_invariant_over_the_whole_float_range(dtype, scales, shape):
    """‖X‖_F = 6e-19 gave singular values of 0.006-0.02 (a fixed +1e-7 in the denominator), fp32
    entries of 1e18 and fp64 entries of 1e155 gave exactly 0 (the norm overflowed)."""
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = K.msign(X.to(dtype))
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    for s in scales:
        Xs = (X * s).to(dtype)
        assert torch.isfinite(Xs).all() and (Xs != 0).all()
        A = K.msign(Xs)
        assert torch.allclose(A, ref, atol=atol, rtol=0), (s, (A - ref).abs().max().item())
    zero = K.msign(torch.zeros(2, *shape, dtype=dtype))
    assert (zero == 0).all()


def _test_matrix(kind, m, n, g):
    if kind == "gauss":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    i = torch.arange(k, dtype=torch.float64)
    sv = {"rank1": (i < 1).double(), "cond1e4": 10 ** (-4 * i / (k - 1)), "cond1e7": 10 ** (-7 * i / (k - 1))}[kind]
    return (U * sv) @ V.mT


@pytest.mark.parametrize("kind", ["gauss", "rank1", "cond1e4", "cond1e7"])
@pytest.mark.parametrize("shape", [(48, 200), (200, 48), (64, 64), (128, 128)])
def test_msign_six_steps_what_docs_kernels_md_states(kind, shape):
    """docs/kernels.md, 6 steps (Euclidean's default): ‖A‖₂ in [1 − 3.4e-6, 1] and ⟨G, A⟩ ≥
    0.997‖G‖_* for every input; all σ within 2e-5 of 1 only for rectangular Gaussians and rank-1
    inputs (it used to say so for every input: square and ill-conditioned ones stay below 1)."""
    assert Euclidean().msign_steps == 6
    G = _test_matrix(kind, *shape, torch.Generator().manual_seed(hash((kind, shape)) % 997))
    for dtype in (torch.float32, torch.float64):
        A = K.msign(G.to(dtype), 6).double()
        s = _svals(A)
        sg = _svals(G)
        assert 1 - 5e-6 <= float(s.max()) <= 1 + 1e-7, (dtype, float(s.max()) - 1)
        assert float((A * G).sum() / sg.sum()) >= 0.997
        rank = int((sg > 1e-12 * sg[0]).sum())
        if kind == "rank1" or (kind == "gauss" and shape[0] != shape[1]):
            assert float((s[:rank] - 1).abs().max()) < 2e-5
        elif kind != "gauss":
            assert float(s[:rank].min()) < 0.5  # the stated limit: small σ stay below 1


# ---------------------------------------------------------------------------- Sinkhorn


def _marginals(P):
    P = P.double()
    return max((P.sum(-1) - 1).abs().max().item(), (P.sum(-2) - 1).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sinkhorn_error_is_that_of_the_returned_half_precision_matrix(dtype):
    """bf16 at tol 1e-5 reported 8.4e-6 (the fp32 iterate) for a result off by 3.2e-3."""
    torch.manual_seed(0)
    L = torch.randn(1024, 4, 4).to(dtype)
    P, err = K.sinkhorn(L, iters=30, return_error=True)
    assert P.dtype == dtype and err.dtype == torch.float32
    assert abs(err.item() - _marginals(P)) <= 1e-6
    assert err.item() <= torch.finfo(dtype).eps  # rounding: up to eps/2 per row sum, plus the iterate
    with pytest.warns(K.SinkhornConvergenceWarning, match=f"rounding the result to {str(dtype)[6:]}"):
        P, err = K.sinkhorn(L, tol=1e-5, return_error=True)
    assert err.item() >= 1e-5 and abs(err.item() - _marginals(P)) <= 1e-6
    with pytest.raises(RuntimeError, match="rounding"):
        K.sinkhorn(L, tol=1e-5, nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.sinkhorn(L, tol=1e-2)  # above the rounding: converged and silent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_error_unchanged_for_float32_and_float64(dtype):
    """The returned matrix is the iterate itself: err is bit for bit the iterate's error."""
    torch.manual_seed(1)
    L = (torch.randn(300, 5, 5) * 2).to(dtype)
    for kwargs in ({"iters": 20}, {"tol": 1e-5}):
        P, err = K.sinkhorn(L, return_error=True, **kwargs)
        assert torch.equal(err, SR._marginal_error(SR._to_batch_last(P, dtype)))


def test_sinkhorn_finite_logits_with_overflowing_spread_and_empty_matrices():
    """±3e38 (finite; max − min overflows) was rejected as 'inf or NaN'; (2, 0, 0) failed in a reshape."""
    P = K.sinkhorn(torch.tensor([[3e38, -3e38], [0.0, 0.0]]), iters=200)
    assert torch.isfinite(P).all() and _marginals(P) < 1e-2
    assert torch.allclose(P, torch.eye(2), atol=1e-2)
    with pytest.raises(ValueError, match="n >= 1"):
        K.sinkhorn(torch.zeros(2, 0, 0))
    with pytest.raises(ValueError, match="inf or NaN"):
        K.sinkhorn(torch.tensor([[float("inf"), 0.0], [0.0, 0.0]]))
    assert K.sinkhorn(torch.zeros(0, 3, 3)).shape == (0, 3, 3)


def test_sinkhorn_compiled_path_flags_non_finite_logits_with_nan(monkeypatch):
    """Under torch.compile the reference cannot raise without a host sync: like the Triton kernel, a
    matrix with a non-finite logit comes back all NaN, err is NaN, and the other matrices are exact."""
    L = torch.randn(6, 3, 3)
    L[1, 0, 0], L[4, 2, 1] = float("nan"), float("-inf")
    monkeypatch.setattr(SR, "_compiling", lambda: True)
    P, err = K.sinkhorn(L, return_error=True)
    bad = torch.tensor([False, True, False, False, True, False])
    assert P[bad].isnan().all() and not P[~bad].isnan().any() and err.isnan()
    monkeypatch.undo()
    assert torch.equal(P[~bad], R.sinkhorn(L[~bad]))
