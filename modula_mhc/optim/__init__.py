"""The dualize-then-retract optimizer and manifold presets."""
from .dualize_retract import DualizeRetract
from .presets import PRESETS, assign_manifolds

__all__ = ["DualizeRetract", "assign_manifolds", "PRESETS"]
