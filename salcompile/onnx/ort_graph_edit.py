"""ONNX graph edits behind export_ort_training.

Before `generate_artifacts` (on the exported forward):
  * `take_markers`: the forward carries marker nodes (domain `salcompile.ort`, op `Mark`, int
    attributes `kind` and `index`) on the tensors the training edits must find again (DFA taps,
    the network output, the gates' features and areas). They become Identity nodes; what they
    marked is returned by (kind, index).
  * `fix_pitfalls`: what ORT's gradient builder cannot take from the dynamo exporter:
    LayerNormalization / Dropout with a single output get their optional outputs named, and
    CastLike (no gradient) becomes Cast.

After `generate_artifacts` (on training_model.onnx; ORT names the gradient of tensor `t` `t_grad`):
  * `fa_edit`: every backward read of an FA weight W, or of a weight-only forward chain of it
    (Transpose, Slice of an area block...; mirrored for B), reads B instead. With match_norm the
    mirrored tensor is first rescaled by ReduceL2(W chain) / max(ReduceL2(B chain), 1e-12), per
    tensor read, i.e. per area block.
  * `override_gradient`: the gradient of a tensor is replaced by nodes the caller adds (DFA's
    e·D for a tap, the local rule for a gate's projection P); what computed it before is pruned.
  * `prune` and `toposort` keep the graph valid.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from ..errors import SalcompileError

MARK_DOMAIN = "salcompile.ort"
TINY = 1e-12
# ops whose value is not a function of their inputs alone: never constant-folded as "constant"
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
           "Multinomial", "Dropout"}
_SHAPE_ONLY = {"Shape", "Size"}


class Names:
    """Fresh tensor / node names for a model."""

    def __init__(self, model):
        g = model.graph
        self.taken: Set[str] = {i.name for i in g.initializer} | {i.name for i in g.input} | \
            {o.name for o in g.output} | {n.name for n in g.node} | \
            {t for n in g.node for t in list(n.input) + list(n.output)}

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


class Builder:
    """Appends nodes and constant initializers to a model (ordering is fixed later by toposort)."""

    def __init__(self, model, prefix: str, names: Optional[Names] = None):
        self.model, self.prefix = model, prefix
        self.names = names or Names(model)

    def const(self, value, dtype=np.float32, name: str = "const") -> str:
        from onnx import numpy_helper
        n = self.names(f"{self.prefix}/{name}")
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), n))
        return n

    def op(self, op_type: str, inputs: List[str], out: Optional[str] = None, n_out: int = 1,
           **attrs):
        from onnx import helper
        outs = [out] if out else [self.names(f"{self.prefix}/{op_type}") for _ in range(n_out)]
        self.model.graph.node.append(helper.make_node(
            op_type, inputs, outs, name=self.names(f"{self.prefix}/{op_type}_node"), **attrs))
        return outs[0] if n_out == 1 else outs


# ---------------------------------------------------------------- before generate_artifacts
def take_markers(model) -> Dict[Tuple[int, int], Tuple[str, str]]:
    """Mark nodes -> Identity; {(kind, index): (marked tensor, the Identity's output)}."""
    from onnx import helper
    found: Dict[Tuple[int, int], Tuple[str, str]] = {}
    for n in model.graph.node:
        if n.domain != MARK_DOMAIN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        found[(int(attrs["kind"]), int(attrs["index"]))] = (n.input[0], n.output[0])
        n.op_type, n.domain = "Identity", ""
        del n.attribute[:]
    keep = [o for o in model.opset_import if o.domain != MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return found


def _elem_types(model) -> Dict[str, int]:
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def cast_like_to_cast(model, who: Optional[str] = None) -> None:
    """CastLike(x, like) -> Cast(x, to=like's type), the type from shape inference: the same
    values, and a node ORT's gradient builder takes (it has no CastLike gradient). With `who`
    (the training artifacts) a type nobody can tell is an error; without, the node is left."""
    from onnx import helper
    types = None
    for n in model.graph.node:
        if n.op_type != "CastLike" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        if types is None:
            try:
                types = _elem_types(model)
            except Exception:
                if who:
                    raise
                return
        to = types.get(n.input[1])
        if not to:
            if who:
                raise SalcompileError(f"{who}: cannot tell the type CastLike node {n.name} casts "
                                      "to (ORT has no gradient for CastLike).")
            continue
        n.op_type = "Cast"
        del n.input[1]
        del n.attribute[:]
        n.attribute.append(helper.make_attribute("to", int(to)))


def fix_pitfalls(model, who: str) -> None:
    names = Names(model)
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "LayerNormalization":
            while len(n.output) < 3:
                n.output.append(names(f"{n.output[0]}_ln_stat"))
        elif n.op_type == "Dropout" and len(n.output) < 2:
            n.output.append(names(f"{n.output[0]}_mask"))
    cast_like_to_cast(model, who)


# ---------------------------------------------------------------- after generate_artifacts
def split(model, loss_grad: str):
    """(forward nodes, backward nodes): backward = everything that depends on the loss's seed
    gradient `loss_grad`."""
    nodes = list(model.graph.node)
    grads = {loss_grad}
    backward: Set[int] = set()
    for n in nodes:   # ONNX node lists are topologically sorted
        if any(i in grads for i in n.input):
            backward.add(id(n))
            grads.update(o for o in n.output if o)
    if not backward:
        raise SalcompileError("export_ort_training: cannot find the backward pass in the training "
                              f"graph (nothing reads {loss_grad}).")
    return [n for n in nodes if id(n) not in backward], [n for n in nodes if id(n) in backward]


def _weight_independent(model, forward, params: Set[str]) -> Set[str]:
    """Tensors whose values depend on no parameter and no activation value: non-parameter
    initializers, constants, shapes, and what forward nodes compute from those alone."""
    g = model.graph
    known = {i.name for i in g.initializer if i.name not in params}
    for n in forward:
        ins = [i for i in n.input if i]
        if n.op_type in _RANDOM:
            continue
        if n.op_type in _SHAPE_ONLY or all(i in known for i in ins):
            known.update(o for o in n.output if o)
    return known


def fa_edit(model, feedback: Dict[str, Optional[np.ndarray]], params: Set[str], loss_grad: str,
            match_norm: bool, derive: Optional[Dict[str, Callable]] = None) -> int:
    """Redirect backward reads of each FA weight (and of its weight-only forward chains) to its
    feedback: the initializer holding its stored tensor, or, for a weight in `derive`, the
    tensor `derive[w](build, w, stored)` computes from W at every step (the sign rules; `build`
    a Builder). Rescaled per read tensor with match_norm. Returns the
    number of redirected inputs."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    forward, backward = split(model, loss_grad)
    names = Names(model)
    constants = _weight_independent(model, forward, params)
    rename: Dict[str, str] = {}   # tensor read by the backward pass -> its feedback counterpart
    owner: Dict[str, str] = {}    # chain tensor -> the FA weight it derives from
    derived = Builder(model, "feedback_rule", names)
    for w, b in feedback.items():
        name = None
        if b is not None:
            name = names(f"{w}_feedback")
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), name))
        if derive and w in derive:   # forward-side nodes: only the backward reads them
            name = derive[w](derived, w, name)
        rename[w] = name
        owner[w] = w
    mirrored = []
    for n in forward:
        ins = [i for i in n.input if i]
        if not ins or n.op_type == "Constant" or n.op_type in _SHAPE_ONLY:
            continue   # a shape of W is the shape of B: read as it is
        roots = {owner[i] for i in ins if i in owner}
        if not roots or not all(i in owner or i in constants for i in ins):
            continue
        if len(roots) > 1:
            raise SalcompileError(
                f"export_ort_training: node {n.name} ({n.op_type}) combines several FA weights "
                f"({', '.join(sorted(roots))}); their feedback cannot be mirrored. Train this "
                "model in torch, or give each layer its own weight.")
        root = roots.pop()
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = names((n.name or n.op_type) + "_feedback_mirror")
        for k, i in enumerate(m.input):
            if i in rename:
                m.input[k] = rename[i]
        for k, o in enumerate(m.output):
            if not o:
                continue
            rename[o] = names(o + "_feedback_mirror")
            owner[o] = root
            m.output[k] = rename[o]
        mirrored.append(m)
    scaled: Dict[str, str] = {}
    build = Builder(model, "feedback_scale", names)

    def target(t: str) -> str:
        if not match_norm:
            return rename[t]
        if t not in scaled:   # B_blk · ‖W_blk‖ / max(‖B_blk‖, tiny), W_blk the tensor read
            nw = build.op("ReduceL2", [t], keepdims=0)
            nb = build.op("ReduceL2", [rename[t]], keepdims=0)
            s = build.op("Div", [nw, build.op("Max", [nb, build.const(TINY, name="tiny")])])
            scaled[t] = build.op("Mul", [rename[t], s], out=names(rename[t] + "_scaled"))
        return scaled[t]

    count = 0
    for n in backward:
        for k, i in enumerate(n.input):
            if i in owner:
                n.input[k] = target(i)
                count += 1
    g.node.extend(mirrored)   # unused mirrors are pruned, the rest ordered by toposort
    return count


def override_gradient(model, tensor: str, build: Callable[[str], None], names: Names) -> bool:
    """Make `tensor`_grad the output of the nodes `build(grad_name)` adds; the nodes that
    computed it before lose that output (and are pruned if nothing else needs them). Returns
    False when the training graph computes no gradient for `tensor`."""
    grad = tensor + "_grad"
    producers = [n for n in model.graph.node if grad in n.output]
    if not producers:
        return False
    for n in producers:
        for k, o in enumerate(n.output):
            if o == grad:
                n.output[k] = names(grad + "_backprop")
    build(grad)
    return True


def sums_of_gemms_to_adds(model) -> int:
    """Sum nodes that read a Gemm output become a chain of Adds (the same values). ORT's
    GemmSumFusion (run when a session loads the graph) fails an internal check on
    Gemm -> Sum when the Gemm reads output 2 or later of a multi-output node (a Split of a
    weight's area blocks, whose gradients are accumulated when top-k routing uses each block
    twice). Returns the number of Sum nodes rewritten."""
    from onnx import helper
    g = model.graph
    gemm_outputs = {o for n in g.node if n.op_type == "Gemm" and n.domain in ("", "ai.onnx")
                    for o in n.output}
    names = Names(model)
    done = 0
    out = []
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type != "Sum" or n.domain not in ("", "ai.onnx") or len(ins) < 2 or \
                not any(i in gemm_outputs for i in ins):
            out.append(n)
            continue
        acc = ins[0]
        for k, i in enumerate(ins[1:]):
            last = k == len(ins) - 2
            res = n.output[0] if last else names(f"{n.output[0]}_partial")
            out.append(helper.make_node("Add", [acc, i], [res],
                                        name=n.name if last else names(f"{n.name}_add")))
            acc = res
        done += 1
    del g.node[:]
    g.node.extend(out)
    return done


def prune(model) -> None:
    """Drop nodes none of whose outputs is needed (graph outputs and their ancestors), then
    initializers nothing reads. The nodes must be topologically sorted."""
    g = model.graph
    need = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output if o):
            keep.append(n)
            need.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inputs = {i.name for i in g.input}
    dead = [k for k, i in enumerate(g.initializer) if i.name not in read and i.name not in inputs]
    for k in reversed(dead):
        del g.initializer[k]


def toposort(model) -> None:
    """Order nodes so each comes after the producers of its inputs (stable for the rest)."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[i] for i in n.input if i in producer} for n in nodes]
    users: Dict[int, List[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    import heapq
    left = [len(d) for d in deps]
    ready = [k for k, c in enumerate(left) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users.get(k, ()):
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise SalcompileError("export_ort_training: the edited training graph has a cycle "
                              "(internal error).")
    del g.node[:]
    g.node.extend(order)


# ---------------------------------------------------------------- gradient subgraphs
def direct_error_nodes(b: Builder, err: str, d_name: str, tap: str, out: str) -> None:
    """out = reshape(reshape(err, [-1, n_out]) @ D, shape(tap)): ops/dfa.py direct_error."""
    # [-1, n_out]: n_out is D's first dimension
    d_rows = b.op("Slice", [b.op("Shape", [d_name]), b.const([0], np.int64, "zero"),
                            b.const([1], np.int64, "one")])
    shape = b.op("Concat", [b.const([-1], np.int64, "minus_one"), d_rows], axis=0)
    e2 = b.op("Reshape", [err, shape])
    b.op("Reshape", [b.op("MatMul", [e2, d_name]), b.op("Shape", [tap])], out=out)


def local_rule_nodes(b: Builder, features: str, proj: str, prototypes: str, area: str,
                     temperature: float, balance_weight: float, areas: int, out: str,
                     top_k: int = 1) -> None:
    """out = dL_local/dP, ops/gate.py local_rule_grad for one process. `top_k` > 1: `area` is
    [..., k] (each row's k winners); the target is the k winners' mean one-hot, f_k counts
    selections (each row k times) and the mean is over rows."""
    f_dim = b.op("Slice", [b.op("Shape", [proj]), b.const([1], np.int64, "one"),
                           b.const([2], np.int64, "two")])
    rows = b.op("Reshape", [features, b.op("Concat", [b.const([-1], np.int64, "minus_one"),
                                                      f_dim], axis=0)])
    u = b.op("MatMul", [rows, b.op("Transpose", [proj], perm=[1, 0])])
    minus_one = b.const([-1], np.int64, "axis_last")
    n = b.op("Max", [b.op("ReduceL2", [u, minus_one], keepdims=1), b.const(TINY, name="tiny")])
    z = b.op("Div", [u, n])
    tau = b.const(temperature, name="temperature")
    s = b.op("Div", [b.op("MatMul", [z, b.op("Transpose", [prototypes], perm=[1, 0])]), tau])
    p = b.op("Softmax", [s], axis=-1)
    depth = b.const(areas, np.int64, "depth")
    values = b.const([0.0, 1.0], name="onehot_values")
    if top_k > 1:
        a = b.op("Reshape", [area, b.const([-1, top_k], np.int64, "rows_by_choice")])
        hot = b.op("OneHot", [a, depth, values], axis=-1)                  # [N, k, K]
        y = b.op("Div", [b.op("ReduceSum", [hot, b.const([1], np.int64, "axis1")], keepdims=0),
                         b.const(float(top_k), name="choices")])         # mean one-hot
        counts = b.op("ReduceSum", [hot, b.const([0, 1], np.int64, "axes01")], keepdims=0)
    else:
        a = b.op("Reshape", [area, b.const([-1], np.int64, "flat")])
        y = b.op("OneHot", [a, depth, values], axis=-1)
        counts = b.op("ReduceSum", [y, b.const([0], np.int64, "axis0")], keepdims=0)
    total = b.op("Max", [b.op("ReduceSum", [counts], keepdims=0), b.const(1.0, name="one_f")])
    frac = b.op("Div", [counts, total])
    if top_k > 1:   # the mean is over rows: selections / k
        total = b.op("Div", [total, b.const(float(top_k), name="choices_rows")])
    pf = b.op("ReduceSum", [b.op("Mul", [p, frac]), minus_one], keepdims=1)
    bal = b.op("Mul", [b.op("Mul", [p, b.op("Sub", [frac, pf])]),
                       b.const(balance_weight * areas, name="balance")])
    gs = b.op("Div", [b.op("Add", [b.op("Sub", [p, y]), bal]), total])
    gz = b.op("Div", [b.op("MatMul", [gs, prototypes]), tau])
    zg = b.op("ReduceSum", [b.op("Mul", [z, gz]), minus_one], keepdims=1)
    gu = b.op("Div", [b.op("Sub", [gz, b.op("Mul", [z, zg])]), n])
    b.op("MatMul", [b.op("Transpose", [gu], perm=[1, 0]), rows], out=out)
