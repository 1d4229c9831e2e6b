"""SALModule: the transformed model, an ordinary nn.Module (an FX GraphModule) plus its plan."""
from __future__ import annotations

from typing import Dict

import torch
import torch.fx as fx

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
