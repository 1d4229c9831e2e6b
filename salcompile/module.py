"""SALModule: the transformed model, an ordinary nn.Module (an FX GraphModule) plus its plan."""
from __future__ import annotations

import re
from typing import Dict

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .config import SALConfig
from .errors import SalcompileError
from .plan import Plan


class SALModule(fx.GraphModule):
    """A model rewritten by salcompile.transform. Train it like the original model.

    `sal_plan` and `sal_config` describe what was done. Its state_dict holds the original keys plus
    the feedback buffers (`<weight>_feedback`, `<weight>_dfa`); loading a state_dict of the
    original model into it is allowed and keeps the feedback buffers as they are.
    """

    def __init__(self, root, graph: fx.Graph, plan: Plan, config: SALConfig, original_keys=()):
        super().__init__(root, graph, class_name="SALModule")
        self.sal_plan = plan
        self.sal_config = config
        self.sal_original_keys = frozenset(original_keys)
        # GraphModule.__deepcopy__ re-sets these on the copy (copy.deepcopy keeps the plan).
        self.meta["_user_preserved_attributes"] = {
            "sal_plan": plan, "sal_config": config, "sal_original_keys": self.sal_original_keys}
        self.register_load_state_dict_post_hook(_allow_missing_feedback)

    # Not traced itself (recursive=False: the module's forward still is): dynamo would guard this
    # frame on the type of `self`, a new class per GraphModule, and recompile for every module.
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except AssertionError as exc:   # torch.export's input guards (the `_guards_fn` node)
            if not str(exc).startswith("Guard failed:"):
                raise
            raise SalcompileError(guard_message(self, str(exc), args, kwargs)) from exc


_GUARD = re.compile(r"Guard failed:\s*(\w+)\.size\(\)\[(\d+)\]\s*(==|<=|>=|<|>|!=)\s*(-?\d+)\s*$")
_BOUND = {"==": "fixed at", "<=": "at most", ">=": "at least", "<": "below", ">": "above",
          "!=": "other than"}


def guard_message(module, guard: str, args, kwargs) -> str:
    """What a failed input guard of a torch.export capture means, and how to capture anew."""
    how = ("torch.export fixes (or bounds) a dimension where the model's code needs it (a layer's "
           "input features, an image's channels, a table of positions) or where the example had "
           "size 1; salcompile also fixes dimension 1 (the sequence) of a model whose outputs do "
           "not have it (a sequence classifier). To accept other sizes, transform the model again "
           "with example_inputs of the size you need (salcompile.transform(model, "
           "example_inputs=(x,), ...)), with a size of 2 or more in every dimension that should "
           "vary.")
    m = _GUARD.match(guard.strip())
    if m is None:
        return (f"the module was called with inputs outside the shapes it was captured for "
                f"({guard.strip()}). {how}")
    name, dim, op, bound = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    got = _input_size(module, name, dim, args, kwargs)
    called = f", and was called with size {got}" if got is not None else ""
    what = " (the batch)" if dim == 0 else ""
    return (f"the module was captured with dimension {dim}{what} of input `{name}` {_BOUND[op]} "
            f"{bound}{called} ({guard.strip()}). {how}")


def _input_size(module, name, dim, args, kwargs):
    """The size `dim` of the call's input `name` (a placeholder of the graph), when the call's
    tensors line up with the placeholders one to one."""
    try:
        names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
        flat = pytree.tree_leaves(args)
        if kwargs or len(flat) != len(names) or name not in names:
            return None
        t = flat[names.index(name)]
        return int(t.shape[dim]) if isinstance(t, torch.Tensor) and t.dim() > dim else None
    except Exception:   # a best-effort detail of an error message
        return None


def _allow_missing_feedback(module, incompatible):
    keys = module.sal_original_keys
    if keys:
        extra = [k for k in incompatible.missing_keys if k not in keys]
        for k in extra:
            incompatible.missing_keys.remove(k)


def require_sal(module) -> "SALModule":
    target = getattr(module, "_orig_mod", module)  # a torch.compile wrapper
    if not isinstance(target, SALModule):
        raise SalcompileError(f"expected a module returned by salcompile.transform(), got "
                              f"{type(module).__name__}. Call salcompile.transform(model) first.")
    return target


def feedback_matrices(module) -> Dict[str, torch.Tensor]:
    """{weight name: its feedback tensor} — B for FA layers, D for DFA layers (shared D appears
    under each weight that reads the same activation)."""
    sal = require_sal(module)
    return {l.weight: sal.get_buffer(l.feedback_buffer) for l in sal.sal_plan.layers
            if l.feedback_buffer}
