"""Audit of the stated constants on networks the other tests do not build: odd powers, scalars,
nested residuals, convolutional layouts, zero-sensitivity repeats and low-precision models.

Each test checks a number against a claim of docs/algebra.md (or a clear error where the claim
cannot be met); the measurements are the library's own estimators, in float64."""

import pytest
import sympy
import torch

from modula_mhc import atoms, bonds, claims, symbolic
from modula_mhc.algebra import Identity, residual

SLACK = 1 + 1e-6
L = sympy.Symbol("L", positive=True, integer=True)
d = sympy.Symbol("d", positive=True, integer=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return claims.unit_rms(torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _pixel_unit(x):
    """Every pixel's channel vector (dim −3) at RMS 1: a well-normed Conv2d input."""
    return x / x.pow(2).mean(dim=-3, keepdim=True).sqrt()


def _pixel_norm(y):
    return float(y.detach().pow(2).mean(dim=-3).sqrt().max())


# ------------------------------------------------------------------ algebra on odd constructions
def _odd_networks():
    lin = atoms.Linear
    shared = lin(8, 8)
    return {
        "pow1": lin(8, 8) ** 1,
        "residual-pow33": residual(lin(4, 4) @ bonds.GELU() @ lin(4, 4), 33) ** 33,
        "sum-of-masses": lin(8, 8, mass=3.0) + bonds.GELU() @ lin(8, 8, mass=0.1),
        "negative-scale": (-2.0) * lin(8, 8) @ bonds.SiLU() @ lin(8, 8),
        "tiny-scale": lin(8, 8) @ (1e-6 * lin(8, 8)),
        "zero-branch": lin(8, 8) + 0 * lin(8, 8),
        "nested-residual": residual(residual(lin(8, 8), 2) @ bonds.GELU(), 3) ** 3,
        "shared-atom": shared @ bonds.GELU() @ shared,
        "width-1": lin(1, 1) @ bonds.GELU() @ lin(1, 1),
    }


@pytest.mark.parametrize("name", sorted(_odd_networks()))
def test_odd_constructions_keep_their_claims(name):
    """In domain, the adversary stays below the declared ν and κ, and dualize has unit norm."""
    torch.manual_seed(0)
    net = _odd_networks()[name].double()
    width = net.atoms()[-1].weight.shape[-1]
    x = _x((3, width))
    cert = claims.certify(net, x)
    assert cert.in_domain, cert.violations
    s = claims.measure_sensitivity(net, x, restarts=2, steps=10)
    assert s.value <= float(net.sensitivity) * SLACK
    w = claims.measure_weight_gain(net, x, restarts=1, steps=6)
    assert w.value <= float(net.weight_gain) * SLACK
    upd = net.dualize([torch.randn_like(p) for p in net.parameters()], target_norm=1.0)
    assert float(net.norm(upd)) == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------ measurement in float64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measurements_of_low_precision_models_are_float64(dtype):
    """The estimators are central differences in float64 (docs/algebra.md); a float32/bfloat16 model
    measured 0 (bf16: check_claims said ok) or above the true constant (float32: ok False)."""
    torch.manual_seed(0)
    net = atoms.Linear(8, 8) @ bonds.GELU() @ atoms.Linear(8, 8)
    ref = net.double()
    x = _x((3, 8))
    exact = claims.measure_sensitivity(ref, x, restarts=1, steps=8).value
    low = net.to(dtype)
    m = claims.measure_sensitivity(low, x.to(dtype), restarts=1, steps=8)
    assert m.value == pytest.approx(exact, rel=1e-2)
    # bf16 rounding leaves ‖W‖ slightly above 1: the certified constant is the one that holds
    assert m.value <= claims.certify(low, x.to(dtype)).certified["sensitivity"] * SLACK
    assert claims.measure_weight_gain(low, x.to(dtype), restarts=1, steps=4).value > 0.5
    report = claims.check_claims(low, x.to(dtype), restarts=1, steps=8)
    assert report["ok"], report["measured"]
    assert low.atoms()[0].weight.dtype == dtype  # the caller's model is not converted


# ------------------------------------------------------------------ Conv2d: per-pixel norm
def test_conv2d_measured_in_its_per_pixel_norm():
    """Conv2d's constants are in the per-pixel RMS over channels (dim −3); the estimators measured
    RMS over the last (spatial) dim and reported ν 3.0 and κ 2.2 for a well-normed Conv2d, and
    check_claims ok False."""
    torch.manual_seed(0)
    conv = atoms.Conv2d(3, 16, 3).double()
    x = _pixel_unit(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert claims.certify(conv, x).in_domain
    m = claims.measure_sensitivity(conv, x, restarts=1, steps=8)
    assert 0.3 < m.value <= float(conv.sensitivity) * SLACK
    dx = m.directions[0]
    with torch.no_grad():
        jv = conv(dx)  # linear in x: its Jacobian at any point applied to dx
    assert _pixel_norm(jv) / _pixel_norm(dx) == pytest.approx(m.value, rel=1e-4)  # the ratio is in that norm
    w = claims.measure_weight_gain(conv, x, restarts=1, steps=4)
    assert 0.3 < w.value <= float(conv.weight_gain) * SLACK
    report = claims.check_claims(conv, x, restarts=1, steps=4)
    assert report["ok"], report["measured"]


def test_cnn_input_side_is_per_pixel():
    """A CNN ending in Linear: the input is a feature map (per-pixel norm), the output a vector."""
    torch.manual_seed(0)
    net = (atoms.Linear(8 * 6 * 6, 10) @ bonds.Flatten() @ bonds.GELU() @ atoms.Conv2d(3, 8, 3)).double()
    x = _pixel_unit(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert claims.certify(net, x).in_domain
    m = claims.measure_sensitivity(net, x, restarts=2, steps=10)
    assert m.value <= float(net.sensitivity) * SLACK
    g = claims.measure_sharpness(net, x, "gamma", restarts=1, steps=6)
    assert g.value <= float(net.sharpness.gamma) * 1.001


# ------------------------------------------------------------------ symbolic repeats
def test_symbolic_repeat_of_nonsmooth_module_is_infinite_not_nan():
    """(ReLU ∘ Linear) ** L: the built network's α, β are ∞ from depth 2 on; the closed form was nan."""
    sym = (bonds.ReLU() @ atoms.Linear(d, d)) ** L
    for depth in (1, 2, 5):
        built = (bonds.ReLU() @ atoms.Linear(6, 6)) ** depth
        for s, b in zip(sym.sharpness, built.sharpness):
            v = symbolic.evaluate(s, d=6, L=depth)
            assert v == float(b) or v == pytest.approx(float(b), rel=1e-12), (depth, v, float(b))


@pytest.mark.parametrize("make", [
    lambda w: atoms.Bias(w),                     # output independent of the input: ν = 0
    lambda w: atoms.Linear(w, w) * 0,            # input scaled by 0
    lambda w: 0 * atoms.Linear(w, w),            # frozen
])
def test_symbolic_repeat_of_zero_sensitivity_module(make):
    """M ** L with ν(M) = 0 divided 0 by 0 (ZeroDivisionError in weight_gain, and so in any
    composition's sharpness); the built network is well defined."""
    sym = atoms.Linear(d, d) @ make(d) ** L
    for depth in (1, 3):
        built = atoms.Linear(6, 6) @ make(6) ** depth
        assert symbolic.evaluate(sym.weight_gain, d=6, L=depth) == pytest.approx(float(built.weight_gain))
        for s, b in zip(sym.sharpness, built.sharpness):
            assert symbolic.evaluate(s, d=6, L=depth) <= float(b) * SLACK + 1e-12
        assert symbolic.evaluate(sym.sensitivity, d=6, L=depth) == pytest.approx(float(built.sensitivity))


def test_sensitivity_formula_equals_built_for_scaled_residual_powers():
    """net.sensitivity of a symbolic construction equals the built one at the same width and depth."""
    def make(w, depth):
        block = (-0.5) * atoms.Linear(w, w) @ bonds.SiLU() @ (atoms.Linear(w, w, mass=2) + Identity())
        return residual(block, depth) ** depth
    sym = make(d, L)
    for depth in (1, 2, 33):
        built = make(5, depth)
        assert symbolic.evaluate(sym.sensitivity, d=5, L=depth) == pytest.approx(float(built.sensitivity), rel=1e-12)
        assert symbolic.evaluate(sym.mass, d=5, L=depth) == pytest.approx(float(built.mass), rel=1e-12)


@pytest.mark.parametrize("build,finite_norm", [
    (lambda: (0.1 * atoms.Linear(8, 8)) ** 64, 6.4),            # c_a down to 6.4e-63: targets 1.6e62
    (lambda: (1e-6 * atoms.Linear(8, 8)) ** 8, 8e-6),            # c_a down to 8e-48
    (lambda: (Identity() + atoms.Linear(8, 8)) ** 128, None),    # c_a up to 2.2e40: targets 4.5e-41
])
def test_deep_power_coefficients_beyond_float32_raise_instead_of_inf_or_zero_updates(build, finite_norm):
    """Norm coefficients of deep ``**`` stacks leave float32's range: ``norm`` accumulates in float64
    and is finite in float64 (it was inf for (I + Linear) ** 128), and ``dualize`` and DualizeRetract
    refuse a dual target float32 cannot carry (the update had non-finite entries, or vanished,
    without an error)."""
    from modula_mhc import optim
    torch.manual_seed(0)
    net = build()
    value = net.norm(dtype=torch.float64)
    assert torch.isfinite(value) and net.norm().dtype == torch.float32
    if finite_norm is not None:
        assert float(value) == pytest.approx(finite_norm, rel=1e-3)
    grads = [torch.randn_like(p) for p in net.parameters()]
    with pytest.raises(ValueError, match="dual target"):
        net.dualize(grads)
    with pytest.raises(ValueError, match="dual target"):
        optim.DualizeRetract(net)


def test_deep_power_within_range_keeps_the_dual_norm_promise():
    """A deep stack whose coefficients stay within the margin still dualizes to norm t exactly."""
    torch.manual_seed(1)
    net = (0.5 * atoms.Linear(8, 8)) ** 24                        # c_a down to ~1e-6
    grads = [torch.randn_like(p) for p in net.parameters()]
    assert float(net.norm(net.dualize(grads, 2.0))) == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("measure", ["measure_sensitivity", "measure_weight_gain", "measure_sharpness"])
def test_measuring_a_tuple_output_model_names_the_problem(measure):
    """A Parallel returns a tuple, which the measurements' norms cannot read: a TypeError that says
    so (it was "unsupported operand type(s) for -: 'tuple' and 'tuple'" from inside the estimator)."""
    from modula_mhc.algebra import Parallel
    net = Parallel(atoms.Linear(8, 8), atoms.Linear(8, 8))
    with pytest.raises(TypeError, match="returns tuple, not a tensor"):
        getattr(claims, measure)(net, torch.randn(4, 8))
