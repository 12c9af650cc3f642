"""The range check of dual targets t/c_a: a norm coefficient c_a of a deep ``**`` stack can put an
atom's target outside what float32 can carry."""
from __future__ import annotations

import torch

from .manifolds.base import compute_dtype

#: a dual target t/c_a must stay this factor inside the range of the dtype its dual is computed in
#: (float32, or float64 for float64 tensors): the dual's entries are of the target's order, and
#: past that they overflow to inf or vanish to 0 without an error ((0.1·M) ** 64 has c_a = 6.4e-63)
TARGET_MARGIN = 1e6


def check_dual_target(target: float, like: torch.Tensor, name: str, what: str) -> float:
    """``target`` (t/c_a), or ValueError when |target| is outside [tiny, max]/``TARGET_MARGIN`` of
    the dtype ``like``'s dual is computed in (0 passes: an atom without influence)."""
    info = torch.finfo(compute_dtype(like))
    if target != 0 and not (info.tiny * TARGET_MARGIN <= abs(target) <= info.max / TARGET_MARGIN):
        raise ValueError(f"{what}: the dual target t/c_a = {target:.3g} of {name} is outside what {info.dtype} can "
                         "carry (its norm coefficient c_a is too large or too small: rescale the network's blocks, "
                         "e.g. residual(block, L), or use float64 weights)")
    return target
