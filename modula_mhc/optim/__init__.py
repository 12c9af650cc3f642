"""The dualize-then-retract optimizer and the manifold presets."""
from .default_lr import lr_for_steps
from .dualize_retract import NONFINITE_POLICIES, DualizeRetract
from .presets import PRESETS, manifold_for_role

__all__ = ["DualizeRetract", "NONFINITE_POLICIES", "PRESETS", "lr_for_steps", "manifold_for_role"]
