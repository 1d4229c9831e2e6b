"""FX passes of salcompile, each a function `pass(gm, ctx) -> gm` named after what it does.

They edit the module in place and return it; `ctx` is the PassContext (context.py) the pipeline
builds once per transform. The order they run in lives in salcompile.pipeline, nowhere else.
"""
from .context import PassContext
from .analyse_sparsity import analyse_sparsity
from .attach_dfa import attach_dfa
from .attach_fa import attach_fa
from .audit_parameters import audit_parameters
from .decompose_addmm import decompose_addmm
from .find_regions import find_regions
from .follow_training_mode import follow_training_mode
from .functionalize_inplace import functionalize_inplace
from .fuse_regions import fuse_regions, unfuse_regions
from .guard_finite import guard_finite
from .insert_gates import insert_gates
from .make_area_ops import make_area_ops
from .normalize_layers import normalize_layers
from .split_shared_path import split_shared_path
from .strip_feedback import strip_feedback

__all__ = ["PassContext", "functionalize_inplace", "normalize_layers", "decompose_addmm", "follow_training_mode",
           "find_regions", "analyse_sparsity", "insert_gates", "make_area_ops", "split_shared_path", "attach_fa",
           "attach_dfa", "guard_finite", "fuse_regions", "unfuse_regions", "audit_parameters",
           "strip_feedback"]
