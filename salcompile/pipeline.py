"""The pipeline, in one place: capture → normalise → analyse → feedback pass → SALModule."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import feedback as feedback_rules
from .capture import capture
from .config import SALConfig
from .errors import SalcompileError
from .module import SALModule
from .plan import Plan, analyse


def _passes():
    # Imported late: `passes` is installed as salcompile.passes, and imports salcompile modules.
    from . import passes
    return passes


def transform(model: nn.Module, example_inputs: Optional[Any] = None,
              config: Optional[SALConfig] = None, *, example_kwargs: Optional[dict] = None,
              **overrides: Any) -> SALModule:
    """Rewrite `model` so it trains with SAL. Returns a new module; `model` is left untouched.

    model: an nn.Module, or a torch.export.ExportedProgram (its example inputs are reused).
    example_inputs: a tuple of example arguments (a batch of 2 or more). Given, the model is captured
    with torch.export (handles attention, functional code); omitted, with torch.fx.symbolic_trace.
    A dict is taken as keyword inputs (as `example_kwargs`).
    example_kwargs: keyword example inputs (`{"input_ids": ids, "labels": y}`), torch.export's
    `kwargs`; the module is then called with the same keywords (ones given as None may be omitted).
    config / overrides: a SALConfig, and/or its fields as keywords (`feedback="dfa"`).
    """
    if config is not None and not isinstance(config, SALConfig):
        raise SalcompileError(f"config must be a salcompile.SALConfig, got {type(config).__name__}.")
    config = (config or SALConfig()).replace(**overrides) if overrides else (config or SALConfig())
    if isinstance(model, SALModule):
        raise SalcompileError("this module has already been transformed by salcompile; transform the "
                              "original model instead.")
    original_keys = _state_keys(model)
    gm, how = capture(model, example_inputs, example_kwargs)
    ctx = _passes().PassContext(config=config, capture=how)
    for step, when in _order(config):
        if when(ctx):
            gm = _run(step, gm, ctx)
    plan = ctx.plan
    for u in plan.backprop:
        warnings.warn(f"salcompile: {u.name} ({u.op}) keeps backprop: {u.reason}.", stacklevel=2)
    sal = SALModule(gm, gm.graph, plan, config, original_keys)
    sal.train(getattr(model, "training", True))
    return sal


def _order(config: SALConfig):
    """The passes in the order they run, each with when it runs: the one place that orders them.
    Every pass is `pass(gm, ctx) -> gm` (passes/context.py)."""
    p = _passes()
    always = lambda ctx: True   # noqa: E731
    gated = lambda ctx: config.gated   # noqa: E731
    family = feedback_rules.get(config.feedback).family   # salcompile/feedback/
    return [
        (p.functionalize_inplace, always),   # in-place ops: explicit dataflow, out of place if safe
        (p.normalize_layers, always),
        (p.decompose_addmm, always),         # addmm & co: a layer plus an add
        (p.follow_training_mode, always),
        (_analyse, always),                  # the plan: layers, weights, the head
        (p.find_regions, gated),
        (_check_routed, gated),
        (p.insert_gates, gated),
        (p.make_area_ops, gated),
        (p.split_shared_path, gated),        # shared_fraction > 0 only
        (p.attach_fa, lambda ctx: family == "fa"),
        (p.attach_dfa, lambda ctx: family == "dfa"),
        (p.guard_finite, lambda ctx: config.check_finite),
        # after feedback buffers and guards are in place
        (p.fuse_regions, lambda ctx: config.gated and config.area_impl == "fast"
         and config.fuse_regions),   # top-k and shared paths too; fuse_regions=False: unfused
        (p.audit_parameters, always),        # last: every weight use of the finished graph
    ]


def _run(step, gm, ctx):
    """One pass; an unexpected failure says which pass it came from."""
    from .passes._meta import fill_vals
    try:
        gm = step(gm, ctx)
        fill_vals(gm)   # the nodes it inserted carry a true meta["val"] (passes/_meta.py)
        return gm
    except SalcompileError:
        raise
    except Exception as exc:
        exc.add_note(f"(in salcompile pass {step.__name__.lstrip('_')})")
        raise


def _analyse(gm, ctx):
    ctx.plan, ctx.specs, ctx.tracer, ctx.head = analyse(gm, ctx.config, ctx.capture)
    if not ctx.plan.layers:
        warnings.warn("salcompile: found no weight-carrying linear map (linear, conv, matmul, "
                      "einsum) in the model: nothing to rewrite, it trains as before.",
                      stacklevel=4)
    return gm


def _check_routed(gm, ctx):
    if not ctx.regions and ctx.config.areas > 1 and ctx.plan.layers:
        _warn_nothing_routed(ctx.plan, ctx.config)
    return gm


def _warn_nothing_routed(plan: Plan, config: SALConfig) -> None:
    why = next((n for n in plan.notes if n.startswith("no SAL region: ")), "no SAL region: ")
    warnings.warn(f"salcompile: areas={config.areas} but no layer is gated "
                  f"({why[len('no SAL region: '):]}): the model trains dense with "
                  f"{config.feedback}; choose the layers to gate with "
                  "SALConfig(gate_layers=[...]), or pass areas=1.", stacklevel=5)


def _state_keys(model):
    if isinstance(model, nn.Module):
        return list(model.state_dict().keys())
    if isinstance(model, torch.export.ExportedProgram):
        return list(model.state_dict.keys())
    return []


def plan(module: nn.Module, example_inputs: Optional[Any] = None,
         config: Optional[SALConfig] = None, *, example_kwargs: Optional[dict] = None,
         **overrides: Any) -> Plan:
    """The plan of a transformed module, or the plan transform() would follow for a plain model."""
    target = getattr(module, "_orig_mod", module)
    if isinstance(target, SALModule):
        return target.sal_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(module, example_inputs, config, example_kwargs=example_kwargs,
                         **overrides).sal_plan
