"""The runtime check: certify at a batch, then try to break the certificate adversarially."""
from __future__ import annotations

from ..module import Module
from ._checks import check_counts
from .certificate import certify, input_part
from .measurement import _float64, measure_sensitivity, measure_sharpness, measure_weight_gain

__all__ = ["check_claims"]


def check_claims(model: Module, x, measure=True, restarts=3, steps=20, sharpness=False, seed=0) -> dict:
    """The runtime check: :func:`certify` at x, and (``measure=True``) adversarial measurements
    (input sensitivity of the part after any embedding, starting at x; weight gain at x; with
    ``sharpness=True`` also γ), on a float64 copy of a model of lower precision. ``ok`` is True when
    every measurement is ≤ its certified value. Input ascent moves x, so the certificate is re-evaluated at the worst input found. Raises
    ValueError for a NaN or inf in x or a weight, and for restarts or steps that are not positive ints."""
    if measure:  # before the certificate's forward pass, not after it
        check_counts("check_claims", restarts=restarts, steps=steps)
        # the measurements run in float64; the certificates at their inputs need the same copy
        model, x = _float64(model, x)
    cert = certify(model, x)
    report = cert.as_dict()
    if not measure:
        return report
    f, xf = input_part(model, x)
    sens = measure_sensitivity(f, xf, restarts=restarts, steps=steps, seed=seed)
    cert_at = certify(f, sens.x if sens.x is not None else xf)
    report["measured"] = dict(sensitivity=sens.value,
                              weight_gain=measure_weight_gain(model, x, restarts=restarts, seed=seed).value)
    report["certified_at_worst_input"] = cert_at.as_dict()
    ok = sens.value <= cert_at.certified["sensitivity"] * (1 + 1e-6) and \
        report["measured"]["weight_gain"] <= cert.certified["weight_gain"] * (1 + 1e-6)
    if sharpness:
        gam = measure_sharpness(f, xf, "gamma", restarts=restarts, steps=steps, seed=seed)
        report["measured"]["gamma"] = gam.value
        ok = ok and gam.value <= certify(f, gam.x if gam.x is not None else xf).certified["gamma"] * (1 + 1e-4)
    report["ok"] = ok
    return report
