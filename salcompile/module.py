"""SALModule: the transformed model, an ordinary nn.Module (an FX GraphModule) plus its plan."""
from __future__ import annotations

import re
from typing import Dict

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .config import SALConfig
from .ops import fast
from .errors import SalcompileError
from .plan import Plan


class SALModule(fx.GraphModule):
    """A model rewritten by salcompile.transform. Train it like the original model.

    `sal_plan` and `sal_config` describe what was done. Its state_dict holds the original keys plus
    the feedback buffers (`<weight>_feedback`, `<weight>_dfa`); loading a state_dict of the
    original model into it is allowed and keeps the feedback buffers as they are (in replicate
    mode each original weight and bias is copied into every area's copy).
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
        self._register_load_state_dict_pre_hook(_copy_into_replicas, with_module=True)

    # Not traced itself (recursive=False: the module's forward still is): dynamo would guard this
    # frame on the type of `self`, a new class per GraphModule, and recompile for every module.
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        if kwargs:
            kwargs = call_kwargs(self, args, kwargs)
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        try:
            # salcompile/ops/fast.py. The builtin check first: under torch.compile (an eval-frame
            # callback) every Python function called from here would be compiled, once per
            # SALModule class
            if fast.frame_callback() is None and fast.plain_eager() and _no_hooks(self):
                return fast.eager_forward(self)(self, *args, **kwargs)
            return super().__call__(*args, **kwargs)
        except AssertionError as exc:   # torch.export's input guards (the `_guards_fn` node)
            if not str(exc).startswith("Guard failed:"):
                raise
            raise SalcompileError(guard_message(self, str(exc), args, kwargs)) from exc


def _no_hooks(module) -> bool:
    """nn.Module.__call__ would call forward directly (its own fast path): no module hooks."""
    m = torch.nn.modules.module
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def input_names(module) -> list:
    """The names of the captured module's inputs, in order (its graph's placeholders)."""
    return [n.target for n in module.graph.nodes if n.op == "placeholder"]


@torch.compiler.disable   # plain Python before the graph runs (SALModule.__call__ is not traced)
def call_kwargs(module, args, kwargs) -> dict:
    """The keyword inputs of a call, checked against the captured inputs (torch.export captures):
    a keyword the capture did not take is dropped when it is None (an optional input left out at
    capture) and refused otherwise; an input captured as None may be omitted."""
    if getattr(getattr(module, "sal_plan", None), "capture", None) != "export":
        return kwargs
    names = input_names(module)
    known = set(names)
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        given = [k for k in unknown if kwargs[k] is not None]
        if given:
            raise SalcompileError(
                f"the module was captured without input(s) {', '.join(given)} (its inputs: "
                f"{', '.join(names) or 'none'}); transform the model again with them in the "
                "example (example_kwargs={...}), or leave them out / pass None.")
        kwargs = {k: v for k, v in kwargs.items() if k in known}
    missing = [n for n in names[len(args):] if n not in kwargs]
    if missing:
        nones = {n.target for n in module.graph.nodes
                 if n.op == "placeholder" and n.target in missing and "val" in n.meta
                 and n.meta["val"] is None}
        still = [n for n in missing if n not in nones]
        if still:
            raise SalcompileError(
                f"the module was captured with input(s) {', '.join(still)} and called without "
                f"them (its inputs: {', '.join(names)}); pass them, or transform the model again "
                "with an example that leaves them out.")
        kwargs = {**kwargs, **{n: None for n in missing}}
    return kwargs


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
        if kwargs and name in kwargs:
            t = kwargs[name]
            return int(t.shape[dim]) if isinstance(t, torch.Tensor) and t.dim() > dim else None
        flat = pytree.tree_leaves(args)
        if kwargs or len(flat) != len(names) or name not in names:
            return None
        t = flat[names.index(name)]
        return int(t.shape[dim]) if isinstance(t, torch.Tensor) and t.dim() > dim else None
    except Exception:   # a best-effort detail of an error message
        return None


def _copy_into_replicas(module, state_dict, prefix, *args):
    """Replicate mode holds K copies [K, *shape] of a gated layer's weight and bias: an original
    model's [*shape] tensor is copied into each of them."""
    if not any(l.area_mode == "replicate" for l in module.sal_plan.layers):
        return
    k = module.sal_config.areas
    params = dict(module.named_parameters(remove_duplicate=False))
    for key, value in list(state_dict.items()):
        p = params.get(key[len(prefix):]) if key.startswith(prefix) else None
        if isinstance(value, torch.Tensor) and p is not None and p.dim() == value.dim() + 1 \
                and tuple(p.shape) == (k, *value.shape):
            state_dict[key] = value.unsqueeze(0).expand(k, *value.shape)


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
    return {l.weight: feedback_tensor(sal, l.feedback_buffer) for l in sal.sal_plan.layers
            if l.feedback_buffer}


def feedback_tensor(sal, name: str) -> torch.Tensor:
    """A feedback tensor by its qualified name: a buffer (fixed B, |B|, D) or, for Kolen-Pollack,
    a parameter."""
    owner, _, leaf = name.rpartition(".")
    return getattr(sal.get_submodule(owner) if owner else sal, leaf)
