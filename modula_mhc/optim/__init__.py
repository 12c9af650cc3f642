"""The dualize-then-retract optimizer and manifold presets."""
from .dualize_retract import NONFINITE_POLICIES, DualizeRetract
from .presets import PRESETS, assign_manifolds

__all__ = ["DualizeRetract", "NONFINITE_POLICIES", "assign_manifolds", "PRESETS"]
