"""The dualize-then-retract optimizer and the manifold presets."""
from .dualize_retract import NONFINITE_POLICIES, DualizeRetract
from .presets import PRESETS, manifold_for_role

__all__ = ["DualizeRetract", "NONFINITE_POLICIES", "PRESETS", "manifold_for_role"]
