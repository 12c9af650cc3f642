"""Claims that hold: adversarial measurement and runtime certification of the library's constants.

Two halves, a module each (``measurement``, ``certificate``; ``check`` runs both, ``norms`` has
the norms they share).

* **Measure** (float64, gradient ascent, several restarts): the largest ratio an adversary finds for

  - input sensitivity   ‖J_x f · Δx‖ / ‖Δx‖                     (:func:`measure_sensitivity`)
  - weight effect       ‖J_w f · Δw‖ / ‖Δw‖_M                   (:func:`measure_weight_gain`)
  - sharpness           ‖D²f[u, v]‖ / (‖u‖‖v‖) for xx, ww, wx   (:func:`measure_sharpness`)

  in the declared norms: max over tokens of the per-token RMS for activations, the modular norm for
  weights. Directions come from a power iteration in those norms (the dual map of the max-RMS norm
  is g_t ↦ g_t/RMS(g_t); of the modular norm ``module.dualize``), inputs from normalised gradient
  ascent on the unit-RMS sphere. Derivatives are central differences in float64 (every module
  supports them, including the Sinkhorn forward pass, which has no forward-mode rule); a model of
  lower precision is measured on a float64 copy. A Conv2d feature map (…, C, H, W) at the model's
  input or output is measured in the Conv2d norm, per-pixel RMS over channels.

* **Certify** (:func:`certify`, :func:`check_claims`): every declared constant holds on a stated
  domain — RMSNorm inputs of RMS ≥ 1, attention q, k, v of RMS ≤ 1, HC/mHC streams of unit RMS,
  atoms with natural norm ≤ 1 (Mix: row-stochastic, ≥ 0), inputs of Linear, Gain, Mix and Gate
  atoms of RMS ≤ 1 and of Conv2d atoms of per-pixel RMS ≤ 1.
  ``certify(model, x)`` runs the model once on x, records those statistics, says which conditions
  fail, and recomputes sensitivity, sharpness and weight gain with the *local* constants at x
  (RMSNorm 1/r, ‖W‖ for a Linear, ‖W‖_{∞→∞} for a Mix, scale·‖g‖_∞ for a Gate, the actual mixing
  coefficients of an HC layer, …). Non-finite x or weights are a ValueError. The local
  constants are true at every input of the batch, for the current weights; inside the domain they
  equal the declared ones. docs/algebra.md ("Certified domain") has the rules.

Example::

    from modula_mhc import claims, compounds
    net = compounds.ResMLP(64, 8, 32, 4).double()
    report = claims.check_claims(net, x)          # x: (batch, 64) float64
    report["in_domain"], report["violations"], report["claimed"], report["certified"], report["measured"]
"""
from .certificate import Certificate, certify, input_part
from .check import check_claims
from .measurement import Measurement, measure_sensitivity, measure_sharpness, measure_weight_gain
from .norms import seq_norm, unit_rms

__all__ = ["seq_norm", "unit_rms", "measure_sensitivity", "measure_weight_gain", "measure_sharpness",
           "certify", "check_claims", "Certificate", "Measurement", "input_part"]
