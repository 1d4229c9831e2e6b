"""One self-contained training step as an ONNX graph, for any (stock) onnxruntime.

    salcompile.export_train_step(sal, (x,), "step.onnx", optimizer="adamw", lr=1e-3)
    sess = salcompile.TrainStepSession("step.onnx", sal.state_dict())
    for x, y in batches:
        loss = sess.step(x, y)
    sal.load_state_dict(sess.state_dict())

The graph computes, for one batch, the loss, the SAL gradients (FA / DFA / BP, the gates' local
rule) written out as ordinary ONNX ops, and one optimizer update exactly as torch.optim does it.
It needs no onnxruntime-training: a plain `onnxruntime.InferenceSession` runs it.

How it is built: a copy of the module's graph is made traceable (routing statistics and finite
checks dropped; routed linear layers kept as the fast area op, whose forward and registered
backward onnx/compact.py exports in the sorted compact form (routed_form="compact"), or replaced
by their masked-dense references (routed_form="masked", and area convolutions always), which the
tests prove equal in outputs and gradients); a Python `step` function runs it with
torch.func.functional_call, takes torch.autograd.grad (the custom ops' registered backward
formulas: FA's dX = dY·B, DFA's e·D, the gates' local rule), applies the optimizer, and is traced
by make_fx into aten ops (each salcompile custom op replaced by an aten form of its forward, the
compact area ops kept for their translations); that graph goes through the standard dynamo ONNX
exporter.

Names (the I/O convention):
  inputs   every parameter under its state_dict name (`fc1.weight`), every buffer the forward
           writes in training mode (batch-norm running stats), the optimizer state
           `<param>.exp_avg`, `<param>.exp_avg_sq` (adamw), `<param>.momentum_buffer` (sgd with
           momentum) and `optimizer.step` (float32 scalar, steps taken), the batch `input`
           (`input_0`, `input_1`... with several model inputs) and `target` (int64 class
           indices [batch] for cross_entropy; the output's shape and dtype for mse).
  outputs  `loss` (a float scalar, the mean loss before the update), then `<name>.new` for every
           state input above, in the same order.
  constant initializers: every other buffer (FA feedback `B`, DFA `D`, gate prototypes), under
           its state_dict name. They never change during training.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import SalcompileError
from ..files import atomic_write, check_output
from ..module import require_sal
from .train_step_graph import WHO as _WHO
from .train_step_graph import _decompositions, _loss, _Optimizer, _trainable_graph
from .ort_graph_edit import cast_like_to_cast
from .train_step_session import LOSS, NEW, STEP
from ..validate import Num, check, flag
from .common import (TRAINING_IR_VERSION as IR_VERSION, TRAINING_OPSET as OPSET,
                     _first_line, _require_onnx, check_training_choices, dynamo_export,
                     failure_cause)

TARGET = "target"


# ---------------------------------------------------------------- the step function
class _Spec:
    """Which tensors are graph inputs (and in which order), and which are constants."""

    def __init__(self, sal, mutable: List[str], n_inputs: int, opt: _Optimizer):
        self.params = [n for n, p in sal.named_parameters()]
        # frozen parameters (requires_grad=False) are carried unchanged, as torch.optim does
        self.trainable = [p.requires_grad for _, p in sal.named_parameters()]
        if not any(self.trainable):
            raise SalcompileError(f"{_WHO}: the module has no trainable parameters.")
        buffers = dict(sal.named_buffers())
        self.mutable = list(mutable)
        self.constants = [n for n in buffers if n not in self.mutable]
        self.slots = opt.slots()
        self.state = [f"{p}.{s}" for s in self.slots for p in self.params]
        if opt.kind == "adamw":
            self.state.append(STEP)
        self.n_inputs = n_inputs
        self.data = (["input"] if self.n_inputs == 1 else
                     [f"input_{i}" for i in range(self.n_inputs)]) + [TARGET]
        # graph inputs, in order; every name but the data has a `.new` output
        self.carried = self.params + self.mutable + self.state
        self.inputs = self.carried + self.constants + self.data
        self.outputs = [LOSS] + [n + NEW for n in self.carried]
        taken = set(self.params) | set(buffers)
        clash = [n for n in self.state + self.data + self.outputs if n in taken]
        if clash:
            raise SalcompileError(f"{_WHO}: the module has parameters or buffers named "
                                  f"{', '.join(clash)}, which the train-step graph uses for its "
                                  "own inputs and outputs; rename them.")


def _probe(gm, example_inputs):
    """(the buffers the training-mode forward writes in place, e.g. batch-norm running
    statistics; the forward's output). Runs on copies: the module itself is left as it was."""
    copies = {n: b.detach().clone() for n, b in gm.named_buffers()}
    versions = {n: b._version for n, b in copies.items()}
    params = {n: p.detach() for n, p in gm.named_parameters()}
    try:
        with torch.no_grad():
            out = torch.func.functional_call(gm, {**params, **copies}, tuple(example_inputs))
    except SalcompileError:
        raise
    except Exception as exc:
        raise SalcompileError(f"{_WHO}: the module does not run on example_inputs "
                              f"({type(exc).__name__}: {_first_line(exc)}).") from exc
    return [n for n, b in copies.items() if b._version != versions[n]], out


def _step_function(gm, spec: _Spec, loss: str, opt: _Optimizer):
    n_params, n_mut, n_state = len(spec.params), len(spec.mutable), len(spec.state)
    n_slots = len(spec.slots)

    def step(*flat):
        it = iter(flat)
        params = [next(it) for _ in range(n_params)]
        mutable = [next(it).clone() for _ in range(n_mut)]
        state = [next(it) for _ in range(n_state)]
        constants = [next(it) for _ in spec.constants]
        inputs = [next(it) for _ in range(spec.n_inputs)]
        target = next(it)
        leaves = [p.detach().requires_grad_(t) for p, t in zip(params, spec.trainable)]
        tensors = {**dict(zip(spec.params, leaves)), **dict(zip(spec.mutable, mutable)),
                   **dict(zip(spec.constants, constants))}
        out = torch.func.functional_call(gm, tensors, tuple(inputs))
        value = _loss(loss, out, target)
        trained = [p for p, t in zip(leaves, spec.trainable) if t]
        found = iter(torch.autograd.grad(value, trained, allow_unused=True))
        grads = [next(found) if t else None for t in spec.trainable]
        count = state[-1] + 1 if opt.kind == "adamw" else None
        new_params, new_slots = [], [[] for _ in range(n_slots)]
        for i, (p, g) in enumerate(zip(params, grads)):
            slots = [state[k * n_params + i] for k in range(n_slots)]
            if g is None:   # frozen, or not used by the loss: torch.optim skips it
                p2, slots2 = p.clone(), [t.clone() for t in slots]
            else:
                p2, slots2 = opt.update(p, g, slots, count)
            new_params.append(p2)
            for k in range(n_slots):
                new_slots[k].append(slots2[k])
        new_state = [t for s in new_slots for t in s] + ([count] if count is not None else [])
        carried = [*new_params, *mutable, *new_state]
        # each output in its input's shape: the exporter writes a Python 1 as a [1] constant,
        # so `count + 1` or `num_batches_tracked.add_(1)` would come out as [1], not []
        # (0-dim ones only: a same-shape reshape of a tensor is exported as a Reshape node,
        # which onnxruntime runs as a copy of every updated parameter and optimizer slot)
        olds = flat[:len(carried)]
        return (value.detach().reshape(()),
                *(t if t.dim() and tuple(t.shape) == tuple(o.shape) else t.reshape(o.shape)
                  for t, o in zip(carried, olds)))

    return step


def _example_flat(sal, spec: _Spec, example_inputs, example_target):
    named = {**dict(sal.named_parameters()), **dict(sal.named_buffers())}
    flat = [named[n].detach() for n in spec.params + spec.mutable]
    for s in spec.state:
        flat.append(torch.zeros((), dtype=torch.float32) if s == STEP
                    else torch.zeros_like(named[s.rsplit(".", 1)[0]]).detach())
    flat += [named[n].detach() for n in spec.constants]
    return flat + [t.detach() for t in example_inputs] + [example_target]


def _trace(step, flat, n_data: int, dynamic_batch: bool):
    """make_fx of `step` on fake inputs whose only symbolic size is the batch (dimension 0 of
    the data): parameter shapes stay static, so the graph carries no shape arithmetic for them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    first_data = len(flat) - n_data

    def fake(i, t):
        dyn = dynamic_batch and i >= first_data and t.dim() > 0
        sizes = [DimDynamic.DYNAMIC if dyn and d == 0 else DimDynamic.STATIC
                 for d in range(t.dim())]
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=sizes))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fakes = [fake(i, t) for i, t in enumerate(flat)]
            with mode:
                return make_fx(step, decomposition_table=_decompositions())(*fakes)
    except SalcompileError:
        raise
    except Exception as exc:
        raise SalcompileError(f"{_WHO}: cannot trace the training step "
                              f"({failure_cause(exc)}).") from exc


# ---------------------------------------------------------------- ONNX
def _export_onnx(traced, flat, spec: _Spec, dynamic_batch: bool, table=None):
    from torch.export import Dim
    n_data = len(spec.data)
    dyn = [None] * (len(flat) - n_data) + [
        {0: Dim.AUTO} if dynamic_batch and t.dim() > 0 else None for t in flat[-n_data:]]
    return dynamo_export(traced, tuple(flat), tuple(dyn), _WHO, OPSET,
                         custom_translation_table=table)


def _rename(model, spec: _Spec, values: Dict[str, torch.Tensor]) -> None:
    """Graph inputs and outputs get the names of the convention; constant inputs become
    initializers holding `values`."""
    import onnx
    from onnx import helper, numpy_helper
    g = model.graph
    if len(g.input) != len(spec.inputs) or len(g.output) != len(spec.outputs):
        raise SalcompileError(f"{_WHO}: the exported graph has {len(g.input)} inputs and "
                              f"{len(g.output)} outputs, expected {len(spec.inputs)} and "
                              f"{len(spec.outputs)}.")
    rename: Dict[str, str] = {}
    for i, name in zip(g.input, spec.inputs):
        rename[i.name] = name
    identities = []
    for o, name in zip(g.output, spec.outputs):
        if o.name in rename:   # an input passed through, or a value output twice
            identities.append(helper.make_node("Identity", [o.name], [name],
                                               name=f"{name}_identity"))
        else:
            rename[o.name] = name
        o.name = name
    for i in g.input:
        i.name = rename[i.name]
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    for node in identities:
        node.input[0] = rename.get(node.input[0], node.input[0])
    g.node.extend(identities)
    for vi in g.value_info:
        vi.name = rename.get(vi.name, vi.name)
    read = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = []
    for i in g.input:
        if i.name in values:
            if i.name in read:
                g.initializer.append(numpy_helper.from_array(
                    values[i.name].detach().cpu().contiguous().numpy(), i.name))
        else:
            keep.append(i)
    del g.input[:]
    g.input.extend(keep)
    cast_like_to_cast(model)   # no constant-folding notices at every session load
    model.ir_version = IR_VERSION
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise SalcompileError(f"{_WHO}: the exported model fails onnx.checker: {exc}") from exc


# ---------------------------------------------------------------- public
def _example_target(out, loss: str):
    if isinstance(out, (tuple, list)):
        out = out[0] if len(out) == 1 else out
    if not isinstance(out, torch.Tensor):
        raise SalcompileError(f"{_WHO}: the module must return one tensor (the loss is computed "
                              f"on it), not {type(out).__name__}.")
    if loss == "cross_entropy":
        return torch.zeros(out.shape[:-1], dtype=torch.long)
    return torch.zeros_like(out)


_NUMBERS = {
    "lr": Num(lo=0, hint="the learning rate, e.g. 1e-3"),
    "weight_decay": Num(lo=0, optional=True, hint="e.g. 0.01, or None for the optimizer's default"),
    "eps": Num(lo=0, hint="AdamW's epsilon, e.g. 1e-8"),
    "momentum": Num(lo=0, hi=1, hint="SGD momentum, e.g. 0.9 (0: none)"),
}


def _check_arguments(lr, weight_decay, betas, eps, momentum, nesterov, dynamic_batch,
                     force) -> None:
    values = dict(lr=lr, weight_decay=weight_decay, eps=eps, momentum=momentum)
    for name, spec in _NUMBERS.items():
        check(name, values[name], spec, _WHO)
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise SalcompileError(f"{_WHO}: betas must be two numbers in [0, 1), got {betas!r}; "
                              "e.g. betas=(0.9, 0.999).")
    for i, b in enumerate(betas):
        check(f"betas[{i}]", b, Num(lo=0, hi=1, hi_open=True, hint="e.g. betas=(0.9, 0.999)"),
              _WHO)
    for name, value in (("nesterov", nesterov), ("dynamic_batch", dynamic_batch),
                        ("force", force)):
        flag(name, value, _WHO)


def export_train_step(module, example_inputs: Tuple[Any, ...], path, loss: str = "cross_entropy",
                      optimizer: str = "adamw", lr: float = 1e-3,
                      weight_decay: Optional[float] = None, betas: Sequence[float] = (0.9, 0.999),
                      eps: float = 1e-8, momentum: float = 0.0, nesterov: bool = False,
                      dynamic_batch: bool = True, force: bool = False,
                      routed_form: str = "compact") -> Dict[str, Any]:
    """Write one SAL training step of `module` to `path` as a self-contained ONNX graph.

    The graph maps (parameters, optimizer state, a batch, its targets) to (loss, updated
    parameters, updated state): forward, the module's own FA/DFA/BP gradients and the gates'
    local rule, and one update equal to torch.optim's `optimizer` ('adamw': torch.optim.AdamW
    with lr, betas, eps, weight_decay (default 0.01); 'sgd': torch.optim.SGD with lr, momentum,
    nesterov, weight_decay (default 0)). `loss`: 'cross_entropy' (mean; int64 class targets,
    per token for [batch, seq, classes] outputs) or 'mse' (mean). Any onnxruntime >= 1.19 runs it
    with a plain InferenceSession; salcompile.TrainStepSession wraps that. Input/output names:
    see this module's docstring. `example_inputs`: a batch (2 or more rows when
    `dynamic_batch`, which makes the batch dimension of the data dynamic). An existing `path` is
    an error unless `force`; the file is written atomically.

    `routed_form`: how routed (area) layers run. 'compact' (the default): each linear area
    layer's rows are sorted by area and each area's block of the weight runs on its own rows
    only, forward and backward (onnx/compact.py; area convolutions stay masked-dense);
    'masked': every area's block on every row, masked (K× the compute). Both give the routed
    result and gradients. Batch norm trains with batch statistics and
    its running statistics are carried state. Dropout (plain and channel) draws its own masks
    in the graph (RandomUniformLike): the distribution is torch's, the numbers are not.
    The file holds the graph only, no weights: TrainStepSession takes them from the module, its
    state_dict or its archive.
    Returns {"path", "inputs", "outputs", "parameters", "state", "constants"}.
    """
    sal = require_sal(module)
    from .common import refuse_training_export
    refuse_training_export(sal, "export_train_step")
    check_training_choices(_WHO, loss, optimizer)
    _check_arguments(lr, weight_decay, betas, eps, momentum, nesterov, dynamic_batch, force)
    out_path = check_output(path, force)
    _require_onnx(_WHO)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t
                           for t in example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise SalcompileError(f"{_WHO}: example_inputs must be a tuple of tensors.")
    if dynamic_batch and any(t.dim() == 0 or t.shape[0] < 2 for t in example_inputs):
        raise SalcompileError(f"{_WHO}: with dynamic_batch, example_inputs need a batch of 2 or "
                              "more (a batch of 1 would fix the graph's batch size at 1); pass "
                              "a bigger batch or dynamic_batch=False.")
    from .compact import check_form, train_step_table
    check_form(_WHO, routed_form)
    opt = _Optimizer(optimizer, lr, weight_decay, betas, eps, momentum, nesterov)
    gm = _trainable_graph(sal, routed_form)
    mutable, out = _probe(gm, example_inputs)
    spec = _Spec(sal, mutable, len(example_inputs), opt)
    target = _example_target(out, loss)
    flat = _example_flat(sal, spec, example_inputs, target)
    traced = _trace(_step_function(gm, spec, loss, opt), flat, len(spec.data), dynamic_batch)
    exported = set(train_step_table()) if routed_form == "compact" else set()
    left = sorted({str(n.target) for n in traced.graph.nodes if n.op == "call_function"
                   and str(n.target).startswith("salcompile.") and n.target not in exported})
    if left:
        raise SalcompileError(f"{_WHO}: no ONNX form for {', '.join(left)}.")
    from .compact import fix_splits, sharing
    with sharing():
        model = _export_onnx(traced, flat, spec, dynamic_batch,
                             train_step_table() if routed_form == "compact" else None)
    fix_splits(model)
    buffers = dict(sal.named_buffers())
    _rename(model, spec, {n: buffers[n] for n in spec.constants})
    model.doc_string = (f"salcompile train step: loss={loss}, optimizer={optimizer}, "
                        f"{opt.describe()}, feedback={sal.sal_config.feedback}")
    data = model.SerializeToString()
    atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))
    inputs = [i.name for i in model.graph.input]
    return {"path": str(out_path), "inputs": inputs,
            "outputs": [o.name for o in model.graph.output], "parameters": list(spec.params),
            "state": [n for n in spec.mutable + spec.state],
            "constants": [i.name for i in model.graph.initializer if i.name in spec.constants]}
