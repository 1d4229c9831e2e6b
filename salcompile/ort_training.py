"""Exporting a transformed module as ONNX Runtime training artifacts with FA gradients.

    salcompile.export_ort_training(sal, (x,), "artifacts/")

writes `training_model.onnx`, `eval_model.onnx`, `optimizer_model.onnx` and `checkpoint` for
`onnxruntime.training.api` (onnxruntime-training 1.19.2). The forward is exported as in
export_onnx, ORT's `generate_artifacts` builds the backprop training graph, and that graph is then
edited for feedback alignment: after the loss node, every backward read of an FA weight `W` (or of
a weight-only forward chain of it, e.g. Transpose(W), which is mirrored for `B`) is redirected to
an added initializer holding the module's feedback buffer `B`. Weight gradients never read `W`'s
values, so one ORT step computes exactly the FA gradients of the torch module.

First slice: dense FA models (`areas=1`, `feedback="fa"`, `feedback_scale="none"`) without
dropout or batch norm (their forward is the eval-mode forward).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Set, Tuple

import torch

from .errors import SalcompileError
from .module import require_sal
from .files import check_output_dir
from .onnx_export import _first_line, _require_onnx, export_graph, inference_graph

ARTIFACTS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
OPSET = 20          # loaded by onnxruntime-training 1.19.2 (supports opsets up to 21)
IR_VERSION = 10
_LOSSES = ("cross_entropy", "mse")
_OPTIMIZERS = ("adamw", "sgd")
_TRAIN_ONLY = ("dropout", "batch_norm", "bernoulli")


def _require_ort_training():
    try:
        from onnxruntime.training import artifacts  # noqa: F401
    except ImportError as exc:
        raise SalcompileError(
            "export_ort_training needs onnxruntime-training: pip install "
            "onnxruntime-training-cpu==1.19.2 (wheels exist for Python <= 3.11)") from exc
    return artifacts


def _check_supported(sal, loss: str, optimizer: str, feedback_scale) -> None:
    if loss not in _LOSSES:
        raise SalcompileError(f"export_ort_training: loss must be one of {', '.join(_LOSSES)}, "
                              f"not {loss!r}.")
    if optimizer not in _OPTIMIZERS:
        raise SalcompileError(f"export_ort_training: optimizer must be one of "
                              f"{', '.join(_OPTIMIZERS)}, not {optimizer!r}.")
    cfg = sal.sal_plan.config
    if cfg.get("feedback") != "fa":
        raise SalcompileError(f"export_ort_training supports feedback='fa' only for now (the "
                              f"module uses {cfg.get('feedback')!r}).")
    if sal.sal_plan.regions or cfg.get("areas", 1) != 1:
        raise SalcompileError("export_ort_training supports dense models only for now: transform "
                              "with areas=1.")
    if feedback_scale != "none":
        raise SalcompileError(
            f"export_ort_training: feedback_scale={feedback_scale!r} is not supported yet (it "
            "rescales B by ||W|| every step, which a static graph edit cannot express); transform "
            "with feedback_scale='none'.")
    for node in sal.graph.nodes:
        if node.op == "call_function":
            name = str(getattr(node.target, "__name__", node.target))
            if any(t in name for t in _TRAIN_ONLY):
                raise SalcompileError(
                    f"export_ort_training does not support models with dropout or batch norm yet "
                    f"(found {name} at {node.name}).")
    for layer in sal.sal_plan.layers:
        if layer.feedback != "fa" or not layer.feedback_buffer:
            raise SalcompileError(f"export_ort_training: layer {layer.name} uses feedback "
                                  f"{layer.feedback!r}; only FA layers are supported for now.")


def _export_forward(sal, example_inputs: Tuple[Any, ...], dynamic_batch: bool):
    proto, out = export_graph(inference_graph(sal), example_inputs, dynamic_batch,
                              "export_ort_training", OPSET)
    if not isinstance(out, torch.Tensor) and not (isinstance(out, (tuple, list)) and len(out) == 1
                                                  and isinstance(out[0], torch.Tensor)):
        raise SalcompileError("export_ort_training: the module must return a single tensor (the "
                              "loss is attached to it).")
    return proto


@contextlib.contextmanager
def _quiet_stderr(log_path: str):
    """Send fd 2 (ORT's C++ and Python INFO lines) to `log_path` for the duration."""
    import sys
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    ort_log = logging.getLogger("onnxruntime")
    level = ort_log.level
    ort_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        ort_log.setLevel(level)


def _fa_edit(model, feedback: Dict[str, torch.Tensor], params: Set[str]) -> int:
    """Redirect backward reads of each FA weight (and of its weight-only forward chains) to its
    feedback initializer. Returns the number of redirected inputs."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    nodes = list(g.node)
    loss_name = g.output[0].name   # generate_artifacts puts the loss first
    grads = {loss_name + "_grad"}   # the seed gradient; the backward pass is what depends on it
    if not any(i in grads for n in nodes for i in n.input):
        raise SalcompileError("export_ort_training: cannot find the backward pass in the training "
                              f"graph (nothing reads {loss_name}_grad).")
    backward_ids = set()
    for n in nodes:   # ONNX node lists are topologically sorted
        if any(i in grads for i in n.input):
            backward_ids.add(id(n))
            grads.update(o for o in n.output if o)
    forward = [n for n in nodes if id(n) not in backward_ids]
    backward = [n for n in nodes if id(n) in backward_ids]
    taken = {i.name for i in g.initializer} | {i.name for i in g.input} | \
        {o for n in nodes for o in n.output}
    constants = {i.name for i in g.initializer if i.name not in params}
    constants |= {o for n in forward if n.op_type == "Constant" for o in n.output}
    # rename: tensor read by the backward pass -> its feedback counterpart
    rename: Dict[str, str] = {}
    owner: Dict[str, str] = {}   # chain tensor -> the FA weight it derives from
    for w, b in feedback.items():
        name = f"{w}_feedback"
        while name in taken:
            name += "_"
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(
            b.detach().cpu().numpy(),
            name))
        rename[w] = name
        owner[w] = w
    mirrored = []
    for n in forward:
        ins = [i for i in n.input if i]
        if not ins or n.op_type == "Constant":
            continue
        roots = {owner[i] for i in ins if i in owner}
        if not roots or not all(i in owner or i in constants for i in ins):
            continue
        if len(roots) > 1:
            raise SalcompileError(f"export_ort_training: node {n.name} ({n.op_type}) combines "
                                  f"several FA weights ({', '.join(sorted(roots))}); not supported.")
        root = roots.pop()
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = (n.name or n.op_type) + "_feedback_mirror"
        for k, i in enumerate(m.input):
            if i in rename:
                m.input[k] = rename[i]
        for k, o in enumerate(m.output):
            if not o:
                continue
            new = o + "_feedback_mirror"
            while new in taken:
                new += "_"
            taken.add(new)
            rename[o] = new
            owner[o] = root
            m.output[k] = new
        mirrored.append((n, m))
    count = 0
    used_mirrors: Set[str] = set()
    for n in backward:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
                used_mirrors.add(rename[i])
                count += 1
    # keep only the mirrored nodes something needs (walk back from the backward reads)
    need = set(used_mirrors)
    keep = {}
    for n, m in reversed(mirrored):
        if any(o in need for o in m.output):
            keep[id(n)] = m
            need.update(m.input)
    ordered = []
    for n in nodes:   # each mirror right after its original: its inputs are ready there
        ordered.append(n)
        if id(n) in keep:
            ordered.append(keep[id(n)])
    del g.node[:]
    g.node.extend(ordered)
    read = {i for n in g.node for i in n.input}
    added = {rename[w] for w in feedback}
    unused = [k for k, i in enumerate(g.initializer) if i.name in added and i.name not in read]
    for k in reversed(unused):   # e.g. the first layer's B: no input gradient is needed
        del g.initializer[k]
    return count


def _normalise(model) -> None:
    model.ir_version = IR_VERSION


def export_ort_training(module, example_inputs: Tuple[Any, ...], out_dir, loss: str = "cross_entropy",
                        optimizer: str = "adamw", force: bool = False,
                        dynamic_batch: bool = True) -> Dict[str, Any]:
    """Write ONNX Runtime training artifacts of a transformed FA module into `out_dir`.

    `module`: a module returned by salcompile.transform with feedback='fa', areas=1 and
    feedback_scale='none', without dropout or batch norm (first slice). `loss`: 'cross_entropy'
    (ORT's mean SoftmaxCrossEntropyLoss; labels int64 of shape [batch]) or 'mse' (mean).
    `optimizer`: 'adamw' or 'sgd'. `out_dir` is created if missing; existing artifacts in it are
    an error unless `force`. Files are written under temporary names and renamed into place.

    Trainable parameters (checkpoint names = the module's state_dict names) are every parameter
    of the module; the FA feedback buffers become constant initializers of training_model.onnx.
    Returns {"files": [...], "parameters": [...], "redirected": n}.
    """
    sal = require_sal(module)
    _check_supported(sal, loss, optimizer, sal.sal_plan.config.get("feedback_scale"))
    _require_onnx()
    artifacts = _require_ort_training()
    out = check_output_dir(out_dir)
    present = [f for f in ARTIFACTS if (out / f).exists()]
    if present and not force:
        raise SalcompileError(f"{out} already holds {', '.join(present)}; pass force=True "
                              "(--force) to overwrite.")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)

    import onnx
    proto = _export_forward(sal, example_inputs, dynamic_batch)
    params = [n for n, _ in sal.named_parameters()]
    inits = {i.name for i in proto.graph.initializer}
    missing = [p for p in params if p not in inits]
    if missing:
        raise SalcompileError(f"export_ort_training: parameters {', '.join(missing)} are not "
                              "initializers of the exported graph (unused or renamed).")
    # keep only parameters as initializers the trainer sees as weights; other initializers stay
    feedback = {l.weight: sal.get_buffer(l.feedback_buffer) for l in sal.sal_plan.layers}
    fallback = {w for f in sal.sal_plan.backprop for w in f.weights}
    both = sorted(set(feedback) & fallback)
    if both:
        raise SalcompileError(f"export_ort_training: {', '.join(both)} feed both FA and backprop "
                              "layers; not supported yet.")

    loss_type = {"cross_entropy": artifacts.LossType.CrossEntropyLoss,
                 "mse": artifacts.LossType.MSELoss}[loss]
    optim_type = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[optimizer]
    tmp = Path(tempfile.mkdtemp(prefix=".ort_training.", dir=out))
    try:
        log = str(tmp / "generate.log")
        try:
            with _quiet_stderr(log):
                artifacts.generate_artifacts(proto, requires_grad=params, frozen_params=[],
                                             loss=loss_type, optimizer=optim_type,
                                             artifact_directory=str(tmp))
        except Exception as exc:
            raise SalcompileError(f"export_ort_training: onnxruntime-training's "
                                  f"generate_artifacts failed ({type(exc).__name__}: "
                                  f"{_first_line(exc)}).") from exc
        train_path = tmp / "training_model.onnx"
        model = onnx.load(str(train_path))
        count = _fa_edit(model, feedback, set(params))
        if feedback and not count:
            raise SalcompileError("export_ort_training: no backward read of an FA weight found in "
                                  "the training graph; the FA edit did nothing.")
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            m = model if name == "training_model.onnx" else onnx.load(str(tmp / name))
            _normalise(m)
            try:
                onnx.checker.check_model(m)
            except Exception as exc:
                raise SalcompileError(f"export_ort_training: {name} fails onnx.checker: "
                                      f"{_first_line(exc)}") from exc
            onnx.save(m, str(tmp / name))
        for name in ARTIFACTS:   # everything is written; now move into place
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": [str(out / f) for f in ARTIFACTS], "parameters": params,
            "redirected": count}


__all__ = ["export_ort_training"]
