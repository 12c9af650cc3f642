"""The constants of a hyper-connection layer's sensitivity bound (the derivation in docs/mhc.md):
how much the output of ``HyperConnections`` moves per unit of input and of each part's weights."""
from __future__ import annotations

import math

from .. import bonds
from .. import scalars as S
from ..algebra import Compose

__all__: list[str] = []  # used by compounds.hyper, not a compound of its own


def sensitivity_constants(layer, nu_f=None) -> dict:
    """The constants of ``layer``'s sensitivity derivation (docs/mhc.md), at well-normed weights and inputs
    (declared domain: unit-RMS streams, ‖φ‖ ≤ 1, ‖g‖_∞ ≤ 1, HC static mixing norm ≤ 1).

    Under ``claims.certify`` the layer has recorded, at the certified batch, the largest stream
    RMS X, the smallest RMS of the flattened stream r, the largest Σ|h_pre|, |h_post|, row sum
    of |H_res| and RMS of F(u), and the weights' norms; the same derivation at that point then
    uses those (X multiplies the coefficient terms Σ dq_j x_j and Σ dH_ij x_j, 1/r the RMS
    normaliser of the coefficient path)."""
    n, rho, beta = layer.streams, layer.residual_scale, layer.branch_scale
    nu_f = float(S.to_number(layer.branch.sensitivity if nu_f is None else nu_f))
    m_f = nu_f if layer.branch_output_bound is None else float(layer.branch_output_bound)
    a = layer.gate.scale if layer.dynamic else 0.0
    m = layer.n_coeffs if layer.dynamic else 0
    st = layer.local_stats()
    xs, inv_r, phi = 1.0, 1.0, 1.0
    if layer.constrained:
        p_max, pre_l1, res_rows = 2.0, float(n), 1.0
        # per unit ‖ΔH̃‖₂: res (Fisher-metric projection bound), pre (σ' ≤ 1/4, ℓ1 ≤ √n ℓ2), post (2σ' ≤ 1/2)
        k_res, k_pre, k_post = (1.0 if layer.dynamic else 0.0), math.sqrt(n) / 4, 0.5
    else:
        p_max, pre_l1, res_rows = 1.0 + a, 1.0 + n * a, 1.0 + n * a
        k_res, k_pre, k_post = math.sqrt(n), math.sqrt(n), 1.0
    inv_u = 1.0
    if st is not None:  # the same bounds at the recorded point (claims.certify)
        p_max, pre_l1, res_rows = st["post_max"], st["pre_l1"], st["res_rows"]
        m_f = st["f_max"]
        xs = max(1.0, st["stream_max"])
        inv_r = math.inf if st["flat_min"] <= 0 else max(1.0, 1.0 / st["flat_min"])
        if layer.dynamic:
            a = layer.gate.scale * st["gate_max"]
            phi = max(1.0, st["phi_norm"])
        if _scale_invariant_branch(layer):
            # F scale-invariant (it reads u through a per-token norm): ‖JF(u)w‖ ≤ ν_F·max_t ‖w_t‖/RMS(u_t) with
            # ν_F at unit RMS, and ‖Σ_j q_j dx_j‖_t ≤ Σ_j|q_tj|·‖dx‖, so the direct term takes
            # max_t Σ_j|q_tj|/RMS(u_t) (= 1 for parallel streams)
            nu_f = _unit_input_sensitivity(layer.branch)
            pre_l1 = st["u_ratio"]
            inv_u = math.inf if st["u_min"] <= 0 else max(1.0, 1.0 / st["u_min"])
    prod = S.product  # 0·∞ = 0: a term that cannot occur contributes nothing
    k_coef = xs * rho * k_res + prod(beta * p_max * nu_f * k_pre * xs, inv_u) + beta * m_f * k_post
    direct = rho * res_rows + prod(beta * p_max * nu_f, pre_l1)
    dynamic = prod(k_coef, a * math.sqrt(m) * phi, inv_r)
    out = dict(direct=direct, dynamic=dynamic, k_coef=k_coef, s_branch=beta * p_max, s_phi=dynamic,
               s_gate=prod(k_coef, math.sqrt(m) * (layer.gate.scale if layer.dynamic else 0.0) * phi, inv_r),
               s_mix=rho * xs)
    if layer.constrained:
        out["s_static"] = k_coef * math.sqrt(2 * n + (n * n if layer.dynamic else 0))
    else:
        out["s_static"] = rho + beta * p_max * nu_f + beta * m_f
    return out


def _scale_invariant_branch(layer) -> bool:
    """True when F(cu) = F(u) for c > 0: the branch starts with an RMSNorm, as the GPT branches, or is
    a foreign pre-norm branch (``HyperBranch.scale_invariant``)."""
    if getattr(layer.branch, "scale_invariant", False):
        return True
    return isinstance(layer.branch, Compose) and isinstance(layer.branch.layers[0], bonds.RMSNorm)


def _unit_input_sensitivity(branch) -> float:
    """ν_F at unit-RMS input: the declared constant, without the local 1/RMS an RMSNorm first layer
    has recorded under certify (the 1/RMS(u) factor is applied by the caller)."""
    first = branch.layers[0] if isinstance(branch, Compose) else None
    saved = first.__dict__.pop("_local_stats", None) if first is not None else None
    try:
        return float(S.to_number(branch.sensitivity))
    finally:
        if saved is not None:
            first._local_stats = saved
