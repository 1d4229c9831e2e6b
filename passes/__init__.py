"""FX passes of salcompile, each a function GraphModule -> GraphModule named after what it does.

They edit the module in place and return it; the order they run in lives in
salcompile.pipeline, nowhere else.
"""
from .attach_dfa import attach_dfa
from .attach_fa import attach_fa
from .follow_training_mode import follow_training_mode
from .normalize_layers import normalize_layers
from .strip_feedback import strip_feedback

__all__ = ["normalize_layers", "follow_training_mode", "attach_fa", "attach_dfa", "strip_feedback"]
