"""Registered layer steps of the calibrated pipeline (see :mod:`.base`)."""

from edgekit.converters.quantize.steps.base import (
    PRUNE,
    RESHAPE,
    ROUND,
    STEPS,
    HeadState,
    LayerState,
    Step,
    StepConfig,
    make_step,
    order_steps,
    register_step,
)

__all__ = ["PRUNE", "RESHAPE", "ROUND", "STEPS", "HeadState", "LayerState", "Step", "StepConfig", "make_step",
           "order_steps", "register_step"]
