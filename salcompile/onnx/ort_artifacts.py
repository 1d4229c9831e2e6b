"""Exporting a transformed module as ONNX Runtime training artifacts with FA / DFA gradients.

    salcompile.export_ort_training(sal, (x,), "artifacts/")

writes `training_model.onnx`, `eval_model.onnx`, `optimizer_model.onnx` and `checkpoint` for
`onnxruntime.training.api` (onnxruntime-training 1.19.2). One ORT training step computes the
gradients of one torch step of the transformed module (same loss, same batch):

  * the forward is the module's train-mode forward, exported like export_onnx, with linear
    routed (area) layers in the sorted compact form (routed_form="compact", the default:
    onnx/compact.py; each area's block runs on its own rows, one sentinel row per area keeps
    ORT's gradient graph valid for empty areas) or masked-dense (routed_form="masked"; area
    convolutions always), with batch norm written out with batch statistics and marker nodes
    on the tensors the edits below need; ORT's `generate_artifacts` builds a backprop training
    graph;
  * FA: after the loss, every backward read of an FA weight W, or of a weight-only forward chain
    of it (Transpose(W), an area's Slice block of W...; mirrored for B), reads an added
    initializer holding the feedback buffer B instead. Weight gradients never read W's values, so
    this is exact. feedback_scale="match": the B tensor read is first multiplied by
    ReduceL2(W tensor) / max(ReduceL2(B tensor), 1e-12) — per layer, and per area block for
    routed layers, as salcompile.ops.fa.rescale / the area ops do;
  * DFA: the gradient of every DFA tap (an activation that feeds a layer) is replaced by
    reshape(reshape(e, [-1, n_out]) @ D_l, shape(tap)), e the gradient of the network output,
    exactly dfa_output's backward; the gradients the tap's consumers computed are dropped, which
    is what the torch module's `tap.detach()` reads do;
  * areas (SAL gates): only the row's area block computes that row, so ORT's gradient of
    a weight block sums only the rows routed to it, as torch's area ops do. The gate's
    projection P is trained by its local rule, as in torch: the forward adds 0·ΣP to the output
    (so ORT makes P trainable), and P's gradient is then replaced by nodes computing
    salcompile.ops.gate.local_rule_grad (winner cross-entropy + load balance, batch statistics of
    this process; with top-k routing, SALConfig(route_top_k=k), the target is the k winners'
    mean one-hot and the fractions count selections). The prototypes are constants. Gradients
    of every parameter, P included, equal the torch module's.

Checkpoint parameter names are the module's state_dict names; parameters with
requires_grad=False are frozen (kept in the checkpoint, not trained), every other one is trainable.
Feedback buffers, prototypes and other buffers are constants of the training graph.

Limits (each raises a SalcompileError saying what to do): the module must return one tensor
(the loss is attached to it: 'cross_entropy' = mean softmax cross-entropy over int64 labels
[batch], 'mse' = mean squared error); a weight may not feed both an FA layer and a backprop
fallback layer; an op with no ONNX form is refused naming it (fused regions are unfused into
area ops first, so transformed models export as they are). Batch norm trains with batch statistics but ORT cannot
write buffers back, so running statistics are not updated: eval_model.onnx normalises with batch
statistics as well. Dropout is active in the training model (ORT's own random masks, so only
p=0 reproduces torch bit for bit) and off in eval_model.onnx. check_finite guards and routing
counters are not part of the ORT graphs. Gate statistics are those of the batch ORT sees (no
process-group sum).
"""
from __future__ import annotations

import contextlib
import logging
import operator
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from .. import feedback as feedback_rules
from ..errors import SalcompileError
from ..files import check_output_dir
from ..layers import get_arg
from ..module import SALModule, feedback_tensor, require_sal
from .train_step_graph import _batch_norm   # batch statistics in plain ops
from .common import (TRAINING_IR_VERSION as IR_VERSION, TRAINING_OPSET as OPSET,
                     _first_line, _require_onnx, check_training_choices, export_graph,
                     failure_cause)
from .inference import inference_graph

ARTIFACTS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
WHO = "export_ort_training"

aten = torch.ops.aten
# marker kinds (ort_graph_edit.take_markers)
TAP, OUT, FEATURES, AREA = 1, 2, 3, 4


@torch.library.custom_op("salcompile_ort::mark", mutates_args=())
def _mark(x: Tensor, kind: int, index: int) -> Tensor:
    """A copy of x; exported as a `salcompile.ort::Mark` node the training edits find again."""
    return x.clone()


@_mark.register_fake
def _(x, kind, index):
    return torch.empty_like(x)


def _translation_table():
    import onnxscript
    from onnx.defs import OpSchema
    schema = OpSchema(
        "Mark", "salcompile.ort", 1, inputs=[OpSchema.FormalParameter("x", "T")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)",
                                 "tensor(bfloat16)", "tensor(int64)", "tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("kind", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("index", OpSchema.AttrType.INT, "")])
    op = onnxscript.values.Op(onnxscript.values.Opset("salcompile.ort", 1), "Mark", schema)

    def mark(x, kind: int, index: int):
        return op(x, kind=kind, index=index)

    from .compact import ort_table
    return {torch.ops.salcompile_ort.mark.default: mark, **ort_table()}


def _require_ort_training():
    try:
        from onnxruntime.training import artifacts  # noqa: F401
    except ImportError as exc:
        raise SalcompileError(
            "export_ort_training needs onnxruntime-training: pip install "
            "onnxruntime-training-cpu==1.19.2 (wheels exist for Python <= 3.11)") from exc
    return artifacts


def _fa_family(layer) -> bool:
    return feedback_rules.get(layer.feedback).family == "fa"


def _derived(rule, bound: float, dtype):
    """The rule's per-step operand as ONNX nodes reading W (see ort_graph_edit.fa_edit)."""
    return lambda build, w, stored: rule.onnx_operand(
        build.op, w, stored, build.const(bound, dtype=dtype, name="bound"))


def _check_supported(sal, loss: str, optimizer: str) -> None:
    check_training_choices(WHO, loss, optimizer)
    rule = feedback_rules.get(sal.sal_plan.config.get("feedback", "fa"))
    if not rule.onnx_training:
        raise SalcompileError(
            f"{WHO}: feedback={rule.name!r} cannot be written into ONNX Runtime's training "
            "artifacts (ORT builds the gradient graph itself and would not hand the trainable "
            "feedback matrix its layer's dW). Train in torch (eager or salcompile.compile), or use "
            "export_train_step, which writes the whole step as one graph.")
    fa = {l.weight for l in sal.sal_plan.layers if _fa_family(l)}
    fallback = {w for f in sal.sal_plan.backprop for w in f.weights}
    both = sorted(fa & fallback)
    if both:
        raise SalcompileError(
            f"{WHO}: {', '.join(both)} feed both an FA layer and a layer trained with backprop "
            "(a fallback); one ONNX gradient graph cannot read W for one and B for the other. "
            "Train this model in torch, or transform with feedback='bp'.")
    for layer in sal.sal_plan.layers:
        if _fa_family(layer) and rule.stored is not None and not layer.feedback_buffer:
            raise SalcompileError(f"{WHO}: FA layer {layer.name} has no feedback buffer; "
                                  "re-run salcompile.transform.")


# ---------------------------------------------------------------- the train-mode forward
def _replace_uses(node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)


def _training_graph(sal, routed_form: str = "compact"
                    ) -> Tuple[fx.GraphModule, List[Tuple[str, str]], List[Dict]]:
    """(the train-mode forward in aten ops with markers, [(tap marker index -> D buffer)],
    [gate info]). Works on a copy of the module's graph; parameters are shared."""
    s = torch.ops.salcompile
    from ..passes.fuse_regions import unfuse_regions
    g = unfuse_regions(sal.graph)   # a copy; fused regions back to one area op per layer
    mark = torch.ops.salcompile_ort.mark.default
    # 1. train mode: batch norm / dropout flags -> True; the step counter is not ORT's business
    for node in list(g.nodes):
        if node.op == "get_attr" and node.target == "training":
            for user in list(node.users):
                if user.target is aten.add_.Tensor and not user.users:
                    g.erase_node(user)   # num_batches_tracked += training
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda n: True if n is node else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: True if n is node else n)
            g.erase_node(node)
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if node.target is aten.batch_norm.default:
            a = list(node.args)
            if a[5] is True:
                with g.inserting_before(node):
                    new = g.call_function(_batch_norm, (a[0], a[1], a[2], None, None, True, 0.0,
                                                        float(a[7])))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                g.erase_node(node)
        elif "batch_norm" in name and True in node.args:
            raise SalcompileError(f"{WHO}: train-mode batch norm op {name} at {node.name} is not "
                                  "supported (only aten.batch_norm); capture the model with "
                                  "torch.export (pass example_inputs to transform).")
    # 2. DFA: every tap's consumers read mark(tap) (the consumers' detach included)
    taps: List[Tuple[str, str]] = []
    dfa_nodes = [n for n in g.nodes if n.op == "call_function" and n.target is s.dfa_output.default]
    for dfa in dfa_nodes:
        _, tap_nodes, d_nodes = dfa.args
        for tap, d in zip(tap_nodes, d_nodes):
            with g.inserting_after(tap):
                m = g.call_function(mark, (tap, TAP, len(taps)))
            m.meta = dict(tap.meta)
            tap.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m and u is not dfa)
            taps.append((d.target, tap.name))
    # 3. gates: mark the features and the areas; anchor P on the output
    gates: List[Dict] = []
    out_node = next(n for n in g.nodes if n.op == "output")
    for gate in [n for n in g.nodes if n.op == "call_function"
                 and n.target in (s.region_gate.default, s.region_gate_topk.default)]:
        feats, proj, protos, temperature, balance = gate.args[:5]
        k = len(gates)
        with g.inserting_before(gate):
            mf = g.call_function(mark, (feats, FEATURES, k))
        mf.meta = dict(feats.meta)
        gate.args = (mf,) + tuple(gate.args[1:])
        area = [u for u in gate.users if u.target is operator.getitem
                and u.args[1] == 0]
        for a in area:
            with g.inserting_after(a):
                ma = g.call_function(mark, (a, AREA, k))
            ma.meta = dict(a.meta)
            _replace_uses(a, ma)
        gates.append({"proj": proj.target, "prototypes": protos.target,
                      "temperature": float(temperature), "balance_weight": float(balance),
                      "areas": int(sal.get_buffer(protos.target).shape[0]), "index": k,
                      "top_k": int(get_arg(gate, "k")) if gate.target is s.region_gate_topk.default
                      else 1})
    # 4. the output: + 0·ΣP per gate (P joins ORT's gradient graph), then the OUT marker
    val = out_node.args[0]
    single = isinstance(val, fx.Node)
    y = val if single else (val[0] if isinstance(val, (tuple, list)) and len(val) == 1 else None)
    if not isinstance(y, fx.Node):
        raise SalcompileError(f"{WHO}: the module must return a single tensor (the loss is "
                              "attached to it).")
    with g.inserting_before(out_node):
        z = y
        for gate in gates:
            p = g.get_attr(gate["proj"])
            z = g.call_function(aten.add.Tensor, (z, g.call_function(
                aten.mul.Tensor, (g.call_function(aten.sum.default, (p,)), 0.0))))
        mo = g.call_function(mark, (z, OUT, 0))
    mo.meta = dict(y.meta)
    out_node.args = (mo,) if single else ((mo,),)
    g.lint()
    tmp = SALModule(sal, g, sal.sal_plan, sal.sal_config)
    try:
        gm = inference_graph(tmp, routed_form)
    except SalcompileError as exc:
        if "no ONNX form" in str(exc):
            raise SalcompileError(
                f"{WHO}: {str(exc).split(': ', 1)[-1]} Transform the model with "
                "salcompile.SALConfig(area_impl='reference') (the masked-dense area ops have an "
                "ONNX form) and export that.") from exc
        raise
    return gm, taps, gates


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


# ---------------------------------------------------------------- edits of the generated graphs
def _edit_training_model(model, sal, marks, taps, gates, params) -> Dict[str, int]:
    from . import ort_graph_edit as ge
    g = model.graph
    loss_grad = g.output[0].name + "_grad"   # generate_artifacts puts the loss first
    plan = sal.sal_plan
    feedback, derive = {}, {}
    for l in plan.layers:
        if not _fa_family(l):
            continue
        rule = feedback_rules.get(l.feedback)
        if l.feedback_buffer:
            feedback[l.weight] = feedback_tensor(sal, l.feedback_buffer).detach().cpu().numpy()
        elif rule.stored is None:
            feedback[l.weight] = None
        if rule.operand is not None:
            derive[l.weight] = _derived(rule, l.feedback_bound,
                                        sal.get_parameter(l.weight).detach().cpu().numpy().dtype)
    match = plan.config.get("feedback_scale") == "match"
    counts = {"redirected": 0, "dfa_taps": 0, "gates": 0}
    if feedback:
        counts["redirected"] = ge.fa_edit(model, feedback, params, loss_grad, match, derive)
        if not counts["redirected"]:
            raise SalcompileError(f"{WHO}: no backward read of an FA weight found in the "
                                  "training graph; the FA edit did nothing.")
    names = ge.Names(model)
    if taps:
        err = marks[(OUT, 0)][1] + "_grad"
        if not any(err in n.output for n in g.node):
            raise SalcompileError(f"{WHO}: the training graph has no gradient of the network "
                                  "output; cannot deliver DFA errors.")
        for i, (d_name, tap) in enumerate(taps):
            d = sal.get_buffer(d_name).detach().cpu().numpy()
            b = ge.Builder(model, f"dfa_{i}", names)
            d_init = b.const(d, d.dtype, "D")
            done = ge.override_gradient(
                model, marks[(TAP, i)][1],
                lambda out: ge.direct_error_nodes(b, err, d_init, marks[(TAP, i)][1], out), names)
            counts["dfa_taps"] += bool(done)
    for gate in gates:
        if gate["proj"] not in params:   # a frozen projection: nothing to train
            continue
        k = gate["index"]
        b = ge.Builder(model, f"gate_{k}", names)
        protos = sal.get_buffer(gate["prototypes"]).detach().cpu().numpy()
        p_init = b.const(protos, protos.dtype, "prototypes")
        done = ge.override_gradient(
            model, gate["proj"],
            lambda out: ge.local_rule_nodes(b, marks[(FEATURES, k)][1], gate["proj"], p_init,
                                            marks[(AREA, k)][1], gate["temperature"],
                                            gate["balance_weight"], gate["areas"], out,
                                            gate["top_k"]), names)
        if not done:
            raise SalcompileError(f"{WHO}: the training graph computes no gradient for gate "
                                  f"projection {gate['proj']} (internal error).")
        counts["gates"] += 1
    ge.toposort(model)   # added nodes sit at the end; prune needs producers before users
    ge.prune(model)
    ge.sums_of_gemms_to_adds(model)
    return counts


def _eval_dropout_off(model) -> None:
    """Dropout nodes of eval_model.onnx get training_mode = False."""
    from onnx import numpy_helper
    import numpy as np
    from . import ort_graph_edit as ge
    off = None
    for n in model.graph.node:
        if n.op_type != "Dropout":
            continue
        if off is None:
            off = ge.Names(model)("dropout_training_mode_off")
            model.graph.initializer.append(numpy_helper.from_array(np.array(False), off))
        while len(n.input) < 3:
            n.input.append("")
        n.input[2] = off


def export_ort_training(module, example_inputs: Tuple[Any, ...], out_dir,
                        loss: str = "cross_entropy", optimizer: str = "adamw",
                        force: bool = False, dynamic_batch: bool = True,
                        routed_form: str = "compact") -> Dict[str, Any]:
    """Write ONNX Runtime training artifacts of a transformed module into `out_dir`.

    `module`: a module returned by salcompile.transform (FA, DFA, BP, usf, brsf or frsf; dense or with
    SAL areas; feedback_scale 'none' or 'match'; batch norm, dropout, layer norm, attention).
    `example_inputs`: a tuple of inputs (a batch of 2 or more when `dynamic_batch`, which makes
    dimension 0 of every input dynamic). `loss`: 'cross_entropy' (ORT's mean
    SoftmaxCrossEntropyLoss; labels int64 of shape [batch]) or 'mse' (mean). `optimizer`: 'adamw'
    or 'sgd'. `routed_form`: 'compact' (default) or 'masked', how linear routed (area) layers
    are written (the module docstring says how; the gradients are the same). `out_dir` is
    created if missing; existing artifacts in it are an error unless
    `force`. Files are written under temporary names and renamed into place.

    One ORT train step gives the torch module's FA / DFA gradients (see the module docstring for
    how, for the gates' local rule and for the limits). Trainable parameters (checkpoint names =
    the module's state_dict names) are the module's parameters with requires_grad, gate
    projections included (they follow their local rule); the others are frozen.
    Returns {"files": [...], "parameters": [...], "redirected": FA reads redirected,
    "dfa_taps": taps given e·D, "gates": gate projections given their local rule}.
    """
    sal = require_sal(module)
    from .common import refuse_training_export
    from .compact import check_form
    refuse_training_export(sal, "export_ort_training")
    check_form(WHO, routed_form)
    _check_supported(sal, loss, optimizer)
    _require_onnx(WHO)
    artifacts = _require_ort_training()
    created = not Path(out_dir).exists()
    out = check_output_dir(out_dir)
    try:
        return _export(sal, example_inputs, out, loss, optimizer, dynamic_batch, force,
                       artifacts, routed_form)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()   # a failed export leaves no empty directory behind
        raise


def _checkable(model):
    """A copy onnx.checker can check: ORT's own gradient ops in the default domain (MaxPoolGrad,
    which onnxruntime-training runs on CPU, has no ONNX schema) are moved to ORT's domain, which
    the checker leaves alone; every other node is checked as it is."""
    ort_ops = [n for n in model.graph.node if not n.domain and n.op_type.endswith("Grad")]
    if not ort_ops:
        return model
    import onnx
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in copy.graph.node:
        if not n.domain and n.op_type.endswith("Grad"):
            n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return copy


def _export(sal, example_inputs, out, loss, optimizer, dynamic_batch, force, artifacts,
            routed_form="compact"):
    present = [f for f in ARTIFACTS if (out / f).exists()]
    if present and not force:
        raise SalcompileError(f"{out} already holds {', '.join(present)}; pass force=True "
                              "(--force) to overwrite.")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)

    import onnx
    from . import ort_graph_edit as ge
    from .compact import fix_splits
    gm, taps, gates = _training_graph(sal, routed_form)
    proto, _ = export_graph(gm, example_inputs, dynamic_batch, WHO, OPSET,
                            custom_translation_table=_translation_table())
    fix_splits(proto)
    marks = ge.take_markers(proto)
    ge.fix_pitfalls(proto, WHO)
    params = [n for n, _ in sal.named_parameters()]
    frozen = [n for n, p in sal.named_parameters() if not p.requires_grad]
    trained = [n for n in params if n not in frozen]
    inits = {i.name for i in proto.graph.initializer}
    missing = [p for p in params if p not in inits]
    if missing:
        raise SalcompileError(f"{WHO}: parameters {', '.join(missing)} are not initializers of "
                              "the exported graph (unused or renamed); every parameter must take "
                              "part in the forward.")

    loss_type = {"cross_entropy": artifacts.LossType.CrossEntropyLoss,
                 "mse": artifacts.LossType.MSELoss}[loss]
    optim_type = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[optimizer]
    tmp = Path(tempfile.mkdtemp(prefix=".ort_training.", dir=out))
    try:
        log = str(tmp / "generate.log")
        try:
            with _quiet_stderr(log):
                artifacts.generate_artifacts(proto, requires_grad=trained, frozen_params=frozen,
                                             loss=loss_type, optimizer=optim_type,
                                             artifact_directory=str(tmp))
        except Exception as exc:
            raise SalcompileError(f"{WHO}: onnxruntime-training's generate_artifacts failed "
                                  f"({failure_cause(exc)}).") from exc
        model = onnx.load(str(tmp / "training_model.onnx"))
        counts = _edit_training_model(model, sal, marks, taps, gates, set(trained))
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            m = model if name == "training_model.onnx" else onnx.load(str(tmp / name))
            if name == "eval_model.onnx":
                _eval_dropout_off(m)
            m.ir_version = IR_VERSION
            try:
                onnx.checker.check_model(_checkable(m))
            except Exception as exc:
                raise SalcompileError(f"{WHO}: {name} fails onnx.checker: "
                                      f"{_first_line(exc)}") from exc
            onnx.save(m, str(tmp / name))
        for name in ARTIFACTS:   # everything is written; now move into place
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": [str(out / f) for f in ARTIFACTS], "parameters": params, "frozen": frozen,
            **counts}


def load_ort_checkpoint(module, checkpoint, strict: bool = True) -> List[str]:
    """Copy the parameters of an ONNX Runtime training checkpoint back into the torch module.

        state = api.CheckpointState.load_checkpoint("artifacts/checkpoint")
        ...train with api.Module / api.Optimizer on `state`...
        load_ort_checkpoint(sal, state)      # or a saved checkpoint's path

    `checkpoint`: an `onnxruntime.training.api.CheckpointState` (the live state ORT trains) or
    the path of a checkpoint file (the artifacts' `checkpoint`, or one written with
    `CheckpointState.save_checkpoint`). Names are the module's state_dict names (as
    export_ort_training wrote them). `strict`: every parameter of the module must be in the
    checkpoint. Buffers (batch-norm running statistics, feedback matrices) are not in ORT's
    checkpoint and stay as they are. Returns the names copied."""
    target = getattr(module, "_orig_mod", module)   # a torch.compile wrapper: its module
    if isinstance(checkpoint, (str, os.PathLike)):
        _require_ort_training()
        from onnxruntime.training import api
        path = Path(checkpoint)
        if path.is_dir() and (path / "checkpoint").is_file():
            path = path / "checkpoint"
        if not path.is_file():
            raise SalcompileError(f"load_ort_checkpoint: {checkpoint} is not a checkpoint file; "
                                  "give the artifacts' `checkpoint` (or its directory) or the "
                                  "CheckpointState you trained with.")
        try:
            checkpoint = api.CheckpointState.load_checkpoint(str(path))
        except Exception as exc:
            raise SalcompileError(f"load_ort_checkpoint: onnxruntime cannot read {path} "
                                  f"({_first_line(exc)}); give a checkpoint written by "
                                  "export_ort_training or CheckpointState.save_checkpoint.") \
                from exc
    if not hasattr(checkpoint, "parameters"):
        raise SalcompileError(f"load_ort_checkpoint: expected an onnxruntime.training.api."
                              f"CheckpointState or a checkpoint path, got "
                              f"{type(checkpoint).__name__}.")
    ort_params = {name: p for name, p in checkpoint.parameters}
    own = dict(target.named_parameters())
    unknown = sorted(set(ort_params) - set(own))
    missing = sorted(set(own) - set(ort_params))
    if unknown:
        raise SalcompileError(f"load_ort_checkpoint: the checkpoint holds {', '.join(unknown)}, "
                              "which the module does not have: it was exported from another "
                              "model; load it into the module export_ort_training was given.")
    if missing and strict:
        raise SalcompileError(f"load_ort_checkpoint: the checkpoint lacks {', '.join(missing)}; "
                              "pass strict=False to load the others.")
    import numpy as np
    values = {}
    for name, p in ort_params.items():
        arr = np.array(p.data)
        if tuple(arr.shape) != tuple(own[name].shape):
            raise SalcompileError(f"load_ort_checkpoint: {name} is {tuple(arr.shape)} in the "
                                  f"checkpoint but {tuple(own[name].shape)} in the module.")
        values[name] = torch.from_numpy(arr)
    with torch.no_grad():   # all checked first: nothing is half-loaded
        for name, v in values.items():
            own[name].copy_(v.to(own[name].device, own[name].dtype))
    return sorted(values)


__all__ = ["export_ort_training", "load_ort_checkpoint"]
