"""Saving a transformed module as a torch.export archive, and loading it back to train."""
from __future__ import annotations

import warnings
from typing import Any, Tuple

import torch

from .capture import export_dynamic
from .errors import SalcompileError
from .files import (CHECKSUM_FILE, PLAN_FILE, _quiet_torch_logs, add_checksum, atomic_write,
                    check_output, load_export, module_from_export)
from .module import require_sal
from .routing import routing_counts_kept


def save(module, example_inputs: Tuple[Any, ...], path, force: bool = False) -> None:
    """Export the transformed module (its FA/DFA ops included) to `path`, atomically.

    Reload with `salcompile.load(path)`; it trains with the same feedback, not with backprop.
    """
    sal = require_sal(module)
    out = check_output(path, force)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    was = sal.training
    sal.train()
    # The archive starts with fresh routing statistics; it holds these very tensors, so it is
    # written inside the block, while they read 0.
    try:
        with routing_counts_kept(sal, zero=True):
            try:
                ep = export_dynamic(sal, tuple(example_inputs))   # batch and sequence
            except Exception as exc:
                raise SalcompileError(f"could not export the transformed module: "
                                      f"{type(exc).__name__}: {exc}") from exc
            def write(tmp):
                with _quiet_torch_logs():
                    torch.export.save(ep, tmp, extra_files={PLAN_FILE: sal.sal_plan.to_json()})
                add_checksum(tmp)   # verified by load: a damaged copy is an error, not a model
            atomic_write(out, write)
    finally:
        sal.train(was)


def load(path) -> torch.nn.Module:
    """Load an archive written by `save`/`convert` as a trainable module (train mode; `.eval()`
    switches dropout off and batch norm to its running statistics, as in the saved module).

    Archives salcompile wrote carry their plan: they come back as a SALModule, so `plan()`,
    `routing_stats`, `feedback_matrices` and `export_onnx` work on them. Other archives come back
    as a plain GraphModule.
    """
    from .config import SALConfig
    from .module import SALModule
    from .plan import Plan
    extra = {PLAN_FILE: ""}
    from .passes import follow_training_mode
    ep = load_export(path, extra_files=extra)
    if extra[PLAN_FILE] and not extra.get(CHECKSUM_FILE):
        warnings.warn(f"salcompile: {path} carries no checksum (written before salcompile "
                      "stored one): it loads, but damage to its contents cannot be detected; save it "
                      "again to add one.", stacklevel=2)
    if not extra[PLAN_FILE]:
        return follow_training_mode(module_from_export(ep))
    # The archive recorded train mode as constants (dropout on, batch statistics): tie them to
    # .train()/.eval() again, as transform() does.
    gm = follow_training_mode(module_from_export(ep, keep_guards=True))
    plan = Plan.from_json(extra[PLAN_FILE])
    fields = dict(plan.config)
    if not isinstance(fields.get("gate_layers"), (list, type(None))):
        fields["gate_layers"] = None  # a predicate was saved as its repr: not restorable
    try:
        config = SALConfig(**fields)
    except (SalcompileError, TypeError):
        return gm  # written by another salcompile version: keep the module, drop the metadata
    sal = SALModule(gm, gm.graph, plan, config)
    sal.train()
    return sal
