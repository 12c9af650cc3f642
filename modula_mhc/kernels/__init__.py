"""Hot kernels: matrix sign (Polar Express), Sinkhorn–Knopp and mHC stream mixing.

Each has a PyTorch reference (``reference.py``, always importable) and, on CUDA, a Triton kernel.
"""

from .reference import (
    POLAR_EXPRESS_COEFFS,
    mhc_coeff_input,
    mhc_post_res,
    mhc_pre,
    msign,
    sinkhorn,
    sinkhorn_project,
)

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "msign",
    "sinkhorn",
    "sinkhorn_project",
    "mhc_coeff_input",
    "mhc_pre",
    "mhc_post_res",
]
