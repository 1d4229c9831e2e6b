"""Hugging Face `transformers.Trainer` with a transformed model.

A transformed Hugging Face model takes the model's keyword inputs and returns its own ModelOutput
(`transform(model, example_inputs={"input_ids": ids, "attention_mask": mask, "labels": y})`), so
the plain `Trainer` trains it: it calls `model(**batch)` and reads `outputs["loss"]`, computed in
the model from `labels` (FA, DFA and SAL areas train on it as on an external loss).

The plain Trainer saves a non-`PreTrainedModel` as `model.safetensors` from `model.state_dict()`
and resumes with `load_state_dict(..., strict=False)`. That works for a transformed model (the
feedback buffers are in the state_dict) unless two of its parameters are one tensor (tied
embeddings: GPT-2's `lm_head.weight` is `transformer.wte.weight`), which safetensors refuses.
`SALTrainer` is the Trainer with:
- checkpoints that keep one name per shared tensor (the first in the state_dict) and reload
  into the tied parameter, without a missing-key warning for the aliases;
- `salcompile_plan.txt` (the printable plan) beside the weights;
- routing statistics (`routing/<gate>/balance`, `active`, `max_load`: salcompile.routing_stats)
  in every training log, over the rows routed since the previous log (the counters are reset).

Resuming: build the same model, transform it with the same arguments (the checkpoint restores
parameters and feedback buffers; the optimizer, scheduler and RNG state are the Trainer's own),
then `trainer.train(resume_from_checkpoint=...)`. `save_pretrained`/`from_pretrained` do not
apply: the transformed module is a graph module, not a `PreTrainedModel`; reload a checkpoint with
`load_checkpoint(sal, checkpoint_dir)`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from transformers import Trainer

from ..module import SALModule
from ..routing import reset_routing_stats
from . import flat_routing_stats

__all__ = ["SALTrainer", "untied_state_dict", "load_checkpoint", "WEIGHTS_NAME"]

WEIGHTS_NAME = "model.safetensors"   # the Trainer's own name (transformers.utils.SAFE_WEIGHTS_NAME)


def _sal(model) -> Optional[SALModule]:
    from ..routing import unwrap
    target = unwrap(model)
    return target if isinstance(target, SALModule) else None


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def shared_aliases(state_dict: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """{alias: kept name} for the entries that are the same tensor as an earlier one."""
    first, aliases = {}, {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def untied_state_dict(module) -> Dict[str, torch.Tensor]:
    """`module.state_dict()` with one name per shared tensor (safetensors refuses aliases)."""
    sd = module.state_dict()
    for alias in shared_aliases(sd):
        del sd[alias]
    return sd


def load_checkpoint(module, checkpoint_dir: str) -> List[str]:
    """Load a Trainer checkpoint's weights into a transformed module; returns the keys the
    checkpoint lacked other than tied aliases (which load through the parameter they share)."""
    from safetensors.torch import load_file
    sd = load_file(os.path.join(checkpoint_dir, WEIGHTS_NAME), device="cpu")
    result = module.load_state_dict(sd, strict=False)
    aliases = shared_aliases(module.state_dict())
    return [k for k in result.missing_keys if k not in aliases]


class SALTrainer(Trainer):
    """`transformers.Trainer` for a module returned by salcompile.transform (see the module
    docstring); with any other model it behaves as the Trainer."""

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        sal = _sal(self.model)
        if sal is None:
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict is None:
            state_dict = self.model.state_dict()
        state_dict = dict(state_dict)
        for alias in shared_aliases(state_dict):
            del state_dict[alias]
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            with open(os.path.join(output_dir, "salcompile_plan.txt"), "w") as f:
                f.write(str(sal.sal_plan) + "\n")

    def _issue_warnings_after_load(self, load_result) -> None:
        sal = _sal(self.model)
        if sal is not None and load_result.missing_keys:
            aliases = shared_aliases(sal.state_dict())
            load_result.missing_keys[:] = [k for k in load_result.missing_keys
                                           if k not in aliases]
        if sal is not None and load_result.missing_keys:
            from transformers.utils import logging
            logging.get_logger(__name__).warning(
                f"There were missing keys in the checkpoint model loaded: "
                f"{load_result.missing_keys}.")
            load_result.missing_keys[:] = []
        super()._issue_warnings_after_load(load_result)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        sal = _sal(self.model)
        if sal is not None and "loss" in logs:
            logs = {**logs, **flat_routing_stats(sal)}
            reset_routing_stats(sal)
        super().log(logs, *args, **kwargs)
