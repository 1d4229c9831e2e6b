"""Capture: a model into an FX GraphModule that keeps every parameter name.

With example inputs: torch.export (non-strict), unlifted to a module whose parameters sit at their
original qualified names. Dimensions 0 (batch) and 1 (sequence, for inputs of 2 or more dims) are
dynamic where the model allows it (`Dim.AUTO`: torch.export fixes what the model needs fixed, such
as an MLP's features or an image's channels). Without: torch.fx.symbolic_trace.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import SalcompileError


def capture(model: nn.Module, example_inputs: Optional[Tuple[Any, ...]] = None,
            example_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[fx.GraphModule, str]:
    """Return (graph module, how it was captured: "export" or "symbolic_trace").

    `example_kwargs` (or a dict given as `example_inputs`) are keyword inputs, passed to
    torch.export's `kwargs`; the captured module takes the same keywords. A keyword given as None
    whose parameter defaults to None is left out (the module then accepts it omitted or None).

    The model is deep-copied first: the transformed module never shares parameters with the
    caller's model, so training one leaves the other untouched.
    """
    if isinstance(model, torch.export.ExportedProgram):
        from .files import module_from_export
        if example_inputs is None and not example_kwargs and model.example_inputs:
            example_inputs = tuple(model.example_inputs[0])
            example_kwargs = dict(model.example_inputs[1] or {})
        model = module_from_export(model)
    if not isinstance(model, nn.Module):
        raise SalcompileError(
            f"transform() needs a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a function in an nn.Module whose forward calls it."
        )
    model = copy.deepcopy(model)
    example_inputs, example_kwargs = split_example_inputs(example_inputs, example_kwargs)
    if example_inputs is not None or example_kwargs:
        example_inputs = () if example_inputs is None else example_inputs
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, tuple):
            example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) \
                else (example_inputs,)
        example_kwargs = _drop_default_nones(model, example_kwargs)
        check_inputs(model, (example_inputs, example_kwargs))
        return _export(model, example_inputs, example_kwargs), "export"
    return _symbolic_trace(model), "symbolic_trace"


def split_example_inputs(example_inputs, example_kwargs=None):
    """(args, kwargs) from transform()'s `example_inputs` / `example_kwargs`: a dict (any Mapping)
    given as `example_inputs` is the keyword inputs."""
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise SalcompileError(f"example_kwargs must be a dict of keyword inputs, got "
                              f"{type(example_kwargs).__name__}.")
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        both = set(example_inputs) & set(kwargs)
        if both:
            raise SalcompileError(f"keyword input(s) {sorted(both)} given both in example_inputs "
                                  "(a dict) and in example_kwargs: give each once.")
        kwargs = {**dict(example_inputs), **kwargs}
        example_inputs = None
    for k in kwargs:
        if not isinstance(k, str):
            raise SalcompileError(f"keyword inputs need string names, got {k!r}.")
    return example_inputs, kwargs


def _drop_default_nones(model: nn.Module, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Leave out keyword inputs given as None whose parameter defaults to None: the same call."""
    if not kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    return {k: v for k, v in kwargs.items()
            if not (v is None and k in params and params[k].default is None)}


def check_inputs(model: nn.Module, example_inputs: tuple) -> None:
    """Refuse dtype and device mixes and empty batches up front, with the fix, instead of a trace
    error (or a module fixed at 0 rows) later."""
    for i, t in enumerate(pytree.tree_leaves(example_inputs)):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 0:
            raise SalcompileError(
                f"example input {i} has an empty batch (shape {list(t.shape)}): the module would "
                "be captured for 0 rows only. Pass a batch of 2 or more real samples, e.g. x[:2].")
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


def dynamic_dims(example_inputs):
    """dynamic_shapes for torch.export: dimension 0 of every tensor input, and dimension 1 of every
    input of 2 or more dims (a sequence: token ids [B, T], features [B, T, F]), may vary.
    Dim.AUTO: torch.export keeps static what the model fixes (an MLP's [B, F] features, an image's
    channels) and a size of 1 in the example."""
    def spec(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return {0: Dim.AUTO, 1: Dim.AUTO} if t.dim() >= 2 else {0: Dim.AUTO}
        return None
    return pytree.tree_map(spec, example_inputs)


def _dynamic_shapes(module, args, kwargs, spec_fn):
    """spec_fn's dynamic_shapes for (args, kwargs): a tuple over args alone (as before), or, with
    keyword inputs, a dict keyed by the forward's parameter names (what torch.export matches
    keyword inputs by)."""
    if not kwargs:
        return spec_fn(args)
    from torch.export.dynamic_shapes import _combine_args
    return spec_fn(_combine_args(module, args, kwargs))


def _has_dim1(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dim() >= 2
               for t in pytree.tree_leaves(example_inputs))


def export_dynamic(module: nn.Module, args: tuple, kwargs: Optional[Mapping[str, Any]] = None
                   ) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with the batch and sequence dimensions dynamic (dynamic_dims).

    The sequence dimension stays dynamic only where it reaches an output (a per-token model: an
    LM's logits [B, T, vocab]); a model that reduces it away (a sequence classifier) keeps the
    example's length, so DFA can size its feedback over it. When export fails with it dynamic,
    the export is retried with the batch alone dynamic, and a warning says so. The error of the
    batch-only export propagates (the caller wraps it). `kwargs`: keyword inputs (torch.export's
    `kwargs`), dynamic like the positional ones."""
    kwargs = dict(kwargs or {})

    def batch_only():
        return _export_program(module, args, _dynamic_shapes(module, args, kwargs, batch_dynamic),
                               kwargs)

    if not _has_dim1((args, kwargs)):
        return batch_only()
    try:
        ep = _export_program(module, args, _dynamic_shapes(module, args, kwargs, dynamic_dims),
                             kwargs)
    except Exception as exc:  # torch raises many types
        ep = batch_only()
        text = str(exc).strip().splitlines()
        warnings.warn(
            "salcompile: torch.export could not keep dimension 1 (the sequence) of the inputs "
            f"dynamic ({type(exc).__name__}: {text[0] if text else ''}); it is fixed at the "
            "example's size: call the module with that size, or capture with an example of the "
            "size you need.", stacklevel=3)
        return ep
    if _dim1_symbols(ep) - _output_symbols(ep):
        ep = batch_only()
    return ep


def _export_program(module, args, dynamic_shapes, kwargs=None):
    with _quiet_specialisation_notice():
        return torch.export.export(module, args, kwargs=kwargs or None,
                                   dynamic_shapes=dynamic_shapes, strict=False)


class _NoSpecialisationNotice(logging.Filter):
    """torch's "dimension ... 0/1 specialized" notice: the batch-1 warning below says it better."""
    def filter(self, record):
        return "0/1 specialized" not in record.getMessage()


@contextlib.contextmanager
def _quiet_specialisation_notice():
    """Also torch's fake-tensor traceback (logged before the exception it raises, which capture
    turns into a SalcompileError): the user sees one clean message, not two."""
    log = logging.getLogger("torch._export.non_strict_utils")
    fake = logging.getLogger("torch._subclasses.fake_tensor")
    f, level = _NoSpecialisationNotice(), fake.level
    log.addFilter(f)
    fake.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.removeFilter(f)
        fake.setLevel(level)


def _symbols(sizes) -> set:
    out = set()
    for d in sizes:
        if isinstance(d, torch.SymInt):
            out |= {str(s) for s in d.node.expr.free_symbols}
    return out


def _dim1_symbols(ep) -> set:
    """Symbols of dimension 1 of the user inputs that stayed dynamic."""
    names = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]
    return _symbols(v.shape[1] for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 2)


def _output_symbols(ep) -> set:
    names = set(ep.graph_signature.user_outputs)
    out = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in pytree.tree_leaves(out.args)
            if isinstance(a, fx.Node) and a.name in names]
    return _symbols(d for v in vals if isinstance(v, torch.Tensor) for d in v.shape)


def _export(model: nn.Module, args: tuple, kwargs: Optional[Dict[str, Any]] = None
            ) -> fx.GraphModule:
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            warnings.warn(
                "example_inputs have batch size 1, so torch.export fixes the batch size at 1; "
                "pass a batch of 2 or more to get a module that accepts any batch size.",
                stacklevel=3)
            break
    was_training = model.training
    model.train()  # capture the training graph; mode-dependent ops are re-tied to .training later
    try:
        ep = export_dynamic(model, args, kwargs)
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
    if ("control flow" in low or "data-dependent" in low or "guard" in low or "bool" in low) \
            and tool.endswith("symbolic_trace"):
        hint = (" The model's Python control flow depends on tensor values (e.g. `if x.sum() > 0:`). "
                "Rewrite it with torch.where / torch.cond, or move that part into a leaf module.")
    elif "data-dependent" in low or "guard" in low:
        hint = (" The model's Python code branches or loops over tensor values (e.g. `if x.sum() > 0:`, "
                "or a mixture of experts' per-expert loop `for e in experts_hit:`), which torch.export "
                "cannot follow. Compute that part with fixed shapes: torch.where / torch.cond, or a "
                "grouped or batched matmul over all experts. Hugging Face MoE models (Mixtral, Qwen-MoE): "
                "call model.set_experts_implementation(\"grouped_mm\") before transform.")
    remedy = ("Pass example_inputs=(x,) so torch.export is used (it handles more models), "
              "or mark the offending submodule as a leaf." if tool.endswith("symbolic_trace")
              else "Check that example_inputs match the model's forward signature and dtypes; "
                   "models with data-dependent Python control flow must use torch.cond.")
    return f"{tool} could not capture the model: {type(exc).__name__}: {first}.{hint} {remedy}"
