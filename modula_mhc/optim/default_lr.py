"""DualizeRetract's default learning rate as a function of run length.

The learning rate transfers across width and depth (the modular norm), not across the number of
steps: with the linear decay schedule the best rate of a T-step run falls like 1/√T, the classic
step size of normalised steepest descent over a fixed horizon. Measured optima (factor-2 grids,
docs/training.md, "Choosing the learning rates"): 150 steps → 0.25, 600 → 0.125, 2400 → 0.0625
(tiny preset); 3200 steps (small preset, tinyshakespeare) → 0.054, the rule's value, of
{0.025, 0.035, 0.054, 0.07, 0.1, 0.15, 0.2, 0.25}.
"""
from __future__ import annotations

import math

#: the best lr of a REFERENCE_STEPS-step run: the tiny preset's grid
REFERENCE_LR, REFERENCE_STEPS = 0.25, 150


def lr_for_steps(steps: int) -> float:
    """lr(T) = 0.25·min(1, √(150/T)) for a T-step run: 0.25 up to 150 steps, 0.125 at 600, 0.0625
    at 2400, 0.054 at 3200 (the optimum was not measured below 150 steps, so it is not raised there)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lr_for_steps: steps must be an int >= 1, got {steps!r}")
    return REFERENCE_LR * min(1.0, math.sqrt(REFERENCE_STEPS / steps))
