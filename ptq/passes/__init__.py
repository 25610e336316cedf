"""Passes that transform a model, and the manager that runs them (see ptq/passes/pipeline.py)."""

from ptq.passes.base import Pass, PassContext, register_pass, registered_passes
from ptq.passes.pipeline import plan_passes, quantize_module_transform_pass

__all__ = ["Pass", "PassContext", "register_pass", "registered_passes", "plan_passes",
           "quantize_module_transform_pass"]
