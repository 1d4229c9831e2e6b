"""Capture: a model into an FX GraphModule that keeps every parameter name.

With example inputs: torch.export (non-strict, batch dimension dynamic), unlifted to a module whose
parameters sit at their original qualified names. Without: torch.fx.symbolic_trace.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import SalcompileError


def capture(model: nn.Module, example_inputs: Optional[Tuple[Any, ...]] = None
            ) -> Tuple[fx.GraphModule, str]:
    """Return (graph module, how it was captured: "export" or "symbolic_trace").

    The model is deep-copied first: the transformed module never shares parameters with the
    caller's model, so training one leaves the other untouched.
    """
    if isinstance(model, torch.export.ExportedProgram):
        from .files import module_from_export
        if example_inputs is None and model.example_inputs:
            example_inputs = tuple(model.example_inputs[0])
        model = module_from_export(model)
    if not isinstance(model, nn.Module):
        raise SalcompileError(
            f"transform() needs a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a function in an nn.Module whose forward calls it."
        )
    model = copy.deepcopy(model)
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, tuple):
            example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) \
                else (example_inputs,)
        check_inputs(model, example_inputs)
        return _export(model, example_inputs), "export"
    return _symbolic_trace(model), "symbolic_trace"


def check_inputs(model: nn.Module, example_inputs: tuple) -> None:
    """Refuse dtype and device mixes up front, with the fix, instead of a trace error later."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        return
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    for i, t in enumerate(pytree.tree_leaves(example_inputs)):
        if not isinstance(t, torch.Tensor):
            continue
        if t.device not in devices:
            raise SalcompileError(
                f"example input {i} is on {t.device}, the model's parameters on "
                f"{sorted(map(str, devices))}: move one to the other (model.to(device) or x.to(...)).")
        if t.is_floating_point() and len(dtypes) == 1 and t.dtype not in dtypes:
            (dt,) = dtypes
            raise SalcompileError(
                f"example input {i} is {t.dtype}, the model's parameters {dt}: cast one to the "
                f"other (x.to({dt}) or model.to({t.dtype})).")
        if t.is_complex():
            raise SalcompileError(f"example input {i} is complex ({t.dtype}); salcompile handles "
                                  "real floating-point and integer inputs.")


def batch_dynamic(example_inputs):
    """dynamic_shapes for torch.export: dimension 0 of every tensor input may vary."""
    def spec(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return {0: Dim.AUTO}
        return None
    return pytree.tree_map(spec, example_inputs)


def _export(model: nn.Module, args: tuple) -> fx.GraphModule:
    for t in pytree.tree_leaves(args):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            warnings.warn(
                "example_inputs have batch size 1, so torch.export fixes the batch size at 1; "
                "pass a batch of 2 or more to get a module that accepts any batch size.",
                stacklevel=3)
            break
    was_training = model.training
    model.train()  # capture the training graph; mode-dependent ops are re-tied to .training later
    try:
        ep = torch.export.export(model, args, dynamic_shapes=batch_dynamic(args), strict=False)
    except Exception as exc:  # torch raises many types; all mean "cannot capture"
        raise SalcompileError(_capture_message("torch.export", exc)) from exc
    unlifted = ep.module()
    # A fresh GraphModule: the unlifted class refuses .train()/.eval().
    gm = fx.GraphModule(unlifted, unlifted.graph)
    gm.train(was_training)
    return gm


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise SalcompileError(_capture_message("torch.fx.symbolic_trace", exc)) from exc
    gm.train(model.training)
    return gm


def _capture_message(tool: str, exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    hint = ""
    low = str(exc).lower()
    if "control flow" in low or "data-dependent" in low or "guard" in low or "bool" in low:
        hint = (" The model's Python control flow depends on tensor values (e.g. `if x.sum() > 0:`). "
                "Rewrite it with torch.where / torch.cond, or move that part into a leaf module.")
    remedy = ("Pass example_inputs=(x,) so torch.export is used (it handles more models), "
              "or mark the offending submodule as a leaf." if tool.endswith("symbolic_trace")
              else "Check that example_inputs match the model's forward signature and dtypes; "
                   "models with data-dependent Python control flow must use torch.cond.")
    return f"{tool} could not capture the model: {type(exc).__name__}: {first}.{hint} {remedy}"
