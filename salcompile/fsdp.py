"""FSDP2 (torch.distributed.fsdp.fully_shard) for transformed models: each layer as a module of
its own (ShardUnit), so that FSDP2 gathers and frees one layer at a time; exported as
salcompile.distributed.fully_shard (docs/distributed.md).

    sal = salcompile.transform(model, example_inputs=(x,), areas=4, area_mode="replicate")
    sal = salcompile.distributed.fully_shard(sal)                 # every rank, same seeds
"""
from __future__ import annotations

import operator
import re
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import SalcompileError
from .routing import unwrap


def _fsdp2():
    """torch's FSDP2 entry point and its module class, or a SalcompileError naming the need."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard as shard
    except ImportError:
        try:   # torch 2.4 / 2.5
            from torch.distributed._composable.fsdp import FSDPModule, fully_shard as shard
        except ImportError:
            shard = FSDPModule = None
    if shard is None:
        raise SalcompileError(
            f"salcompile.distributed.fully_shard needs FSDP2 (torch.distributed.fsdp.fully_shard, "
            f"torch >= 2.4; 2.6 or newer recommended); this torch is {torch.__version__}. Upgrade "
            f"torch, or use salcompile.distributed.data_parallel (DDP) instead.")
    return shard, FSDPModule


class ShardUnit(nn.Module):
    """One layer of a transformed module as a module of its own, so that FSDP2 can shard it: its
    forward runs the graph's nodes on this layer's parameters (its op, plus what reads only the
    parameters: slices, a derived B, a bias added after the op), the other values (activations,
    routing) passed in. It takes over the original submodule's parameters and buffers under the
    same names, so `state_dict` keys do not change."""

    def __init__(self, old: nn.Module, code: str, fn):
        super().__init__()
        for key in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            setattr(self, key, getattr(old, key))
        self.sal_code = code
        self._sal_fn = fn

    def forward(self, *inputs):
        return self._sal_fn(self, *inputs)

    def extra_repr(self) -> str:
        ops = sorted(set(re.findall(r"torch\.ops\.(\w+\.\w+)", self.sal_code)))
        return "ops=" + ", ".join(ops)


def _reach(start, step) -> set:
    """Every node reached from `start` by following `step` (users, or inputs) one or more times."""
    seen, stack = set(), list(start)
    while stack:
        for n in step(stack.pop()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _unit_nodes(graph: "torch.fx.Graph", owner: str, attrs: Dict[str, str]):
    """The nodes of `graph` a unit of submodule `owner` would run (a set), or None when it cannot
    be one: its parameters' readers, the nodes computed from the parameters alone (slices, a
    derived feedback operand), its buffers that only these read (with their slices), and what
    lies between them. `attrs`: qualified attribute name -> "param" | "buffer", owner's own."""
    gets = [n for n in graph.nodes if n.op == "get_attr" and n.target in attrs]
    unit = {n for n in gets if attrs[n.target] == "param"}
    frontier = list(unit)
    while frontier:   # readers of the parameters, through the nodes that read nothing else
        node = frontier.pop()
        for user in node.users:
            if user in unit:
                continue
            unit.add(user)
            if all(i in unit for i in user.all_input_nodes):
                frontier.append(user)
    for b in gets:   # a buffer, with what is computed from it alone, when only the unit reads it
        if attrs[b.target] != "buffer" or not b.users:
            continue
        chain, frontier, alone = {b}, [b], True
        while frontier and alone:
            for user in frontier.pop().users:
                if user in unit or user in chain:
                    continue
                if all(i in chain for i in user.all_input_nodes):
                    chain.add(user)
                    frontier.append(user)
                else:
                    alone = False   # read outside the unit (a shared D, a routing counter)
        if alone:
            unit |= chain
    # between two of its nodes: the unit must be convex (no path leaves it and comes back)
    down = _reach(unit, lambda n: n.users)
    up = _reach(unit, lambda n: n.all_input_nodes)
    unit |= down & up
    for n in unit:
        if n.op in ("placeholder", "output", "call_module") or (
                n.op == "get_attr" and n.target not in attrs):
            return None   # another layer's parameter, a submodule call, the graph's ends
        if n.op == "get_attr":
            continue
        for i in n.all_input_nodes:
            if i.op == "get_attr" and i not in unit and i.target in attrs \
                    and attrs[i.target] == "param":
                return None
    return unit


def _stable_topological_sort(graph: "torch.fx.Graph") -> None:
    """Reorder `graph` so that every node follows its inputs, moving as few as possible."""
    import heapq
    order = {n: i for i, n in enumerate(graph.nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    ready = [(order[n], n.name, n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, _, node = heapq.heappop(ready)
        out.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (order[user], user.name, user))
    if len(out) != len(order):
        raise SalcompileError("shard_units: the rewritten graph has a cycle (a salcompile bug; "
                              "use fully_shard(..., per_layer=False) meanwhile).")
    for prev, node in zip(out, out[1:]):
        if node.prev is not prev:
            prev.append(node)


def shard_units(module: nn.Module, shard_feedback: bool = True) -> List[str]:
    """Rewrite a transformed module in place so that each layer is a submodule called from the
    graph (a `ShardUnit`), the granularity FSDP2 shards at; returns the units' names.

    A SALModule's graph reads every parameter with `get_attr` and calls salcompile's ops itself:
    no submodule's forward runs, so FSDP2 hooks on a submodule would never fire (its parameters
    would reach the ops as sharded DTensors). A unit is made of a submodule holding parameters
    (a linear / conv / norm layer, a gate's projection) and the graph's nodes that read them: the
    layer's op (or ops: a shared path's two halves), what is computed from the parameters alone
    (slices, the derived B of usf / brsf / frsf) and what lies between (top-k's row sum before
    the bias); those nodes become one call of the unit. Parameters a unit cannot own stay with
    the root module (one FSDP group): tied ones, a module-level parameter (a position table), a
    parameter read together with another layer's (a composed weight).
    `shard_feedback=True` turns the feedback buffers (B, |B|, D) only a unit reads into frozen
    parameters (requires_grad=False, same names) so that FSDP2 shards them with the weight;
    otherwise, and for feedback read by several layers (DFA's shared D), they stay replicated
    buffers. Values and gradients are unchanged (random draws, brsf's, may come in another order).
    """
    sal = unwrap(module)
    from .module import SALModule
    if not isinstance(sal, SALModule):
        raise SalcompileError(f"shard_units needs the module salcompile.transform returned, got "
                              f"{type(module).__name__}.")
    graph = sal.graph
    seen: Dict[int, int] = {}   # how many names each parameter has (tied weights: several)
    for _, p in sal.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    feedback = {l.feedback_buffer for l in sal.sal_plan.layers if l.feedback_buffer}
    owners = []
    for node in graph.nodes:   # in the order the graph reads them
        if node.op == "get_attr" and "." in node.target:
            owner = node.target.rpartition(".")[0]
            if owner not in owners:
                owners.append(owner)
    units = []
    for owner in owners:
        sub = sal.get_submodule(owner)
        if type(sub) is not nn.Module or any(True for _ in sub.children()):
            continue   # a unit already, another module kind, or nested parameter holders
        direct = dict(sub.named_parameters(recurse=False))
        if not direct or any(seen.get(id(p), 1) > 1 for p in direct.values()):
            continue   # no parameters, or tied ones
        attrs = {f"{owner}.{n}": "param" for n in direct}
        attrs.update({f"{owner}.{n}": "buffer" for n, _ in sub.named_buffers(recurse=False)})
        nodes = _unit_nodes(graph, owner, attrs)
        if nodes is None or not any(n.op == "call_function" for n in nodes):
            continue
        body = [n for n in graph.nodes if n in nodes]
        inputs = []
        for n in body:
            for i in n.all_input_nodes:
                if i not in nodes and i not in inputs:
                    inputs.append(i)
        outputs = [n for n in body if any(u not in nodes for u in n.users)]
        sub_graph = torch.fx.Graph()
        env = {}
        for i in inputs:
            env[i] = sub_graph.placeholder(i.name)
            env[i].meta.update(i.meta)
        for n in body:
            if n.op == "get_attr":
                env[n] = sub_graph.get_attr(n.target.rpartition(".")[2])
                env[n].meta.update(n.meta)
            else:
                env[n] = sub_graph.node_copy(n, lambda a: env[a])
        sub_graph.output(env[outputs[0]] if len(outputs) == 1
                         else tuple(env[o] for o in outputs))
        code = sub_graph.python_code(root_module="self")
        glb = dict(code.globals)
        exec(compile(code.src, f"<salcompile shard unit {owner}>", "exec"), glb)
        unit = ShardUnit(sub, code.src, glb["forward"])
        if shard_feedback:
            for n in body:
                leaf = n.target.rpartition(".")[2] if n.op == "get_attr" else None
                if leaf is not None and n.target in feedback and leaf in unit._buffers \
                        and leaf not in unit._non_persistent_buffers_set:
                    unit._parameters[leaf] = nn.Parameter(unit._buffers.pop(leaf),
                                                          requires_grad=False)
        parent, _, leaf = owner.rpartition(".")
        setattr(sal.get_submodule(parent), leaf, unit)
        with graph.inserting_before(body[-1]):
            call = graph.call_module(owner, tuple(inputs))
            if len(outputs) == 1:
                outputs[0].replace_all_uses_with(call)
            else:
                for k, o in enumerate(outputs):
                    get = graph.call_function(operator.getitem, (call, k))
                    get.meta.update(o.meta)
                    o.replace_all_uses_with(get)
        if len(outputs) == 1:
            call.meta.update(outputs[0].meta)
        for n in reversed(body):
            graph.erase_node(n)
        units.append(owner)
    if units:
        _stable_topological_sort(graph)
        graph.lint()
        sal.recompile()
    return units


def _mesh_group(mesh):
    """The process group the gates' statistics are summed over for an FSDP mesh."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None   # HSDP over the whole world: WORLD
    raise SalcompileError(
        f"fully_shard: a {mesh.ndim}-D device mesh over {mesh.size()} of "
        f"{dist.get_world_size()} processes; the gates would need its data-parallel group. Use a "
        f"1-D mesh, or a mesh over every process.")


def fully_shard(module: nn.Module, mesh=None, *, per_layer: bool = True,
                shard_feedback: bool = True, sync_module_states: bool = True,
                **fsdp_kwargs) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) for a transformed module, in place; returns
    it (now also an `FSDPModule`: `unshard`, `reshard`, `set_requires_gradient_sync`, ...).

    - `per_layer=True`: each layer (its weight, bias and feedback) is its own FSDP group
      (`shard_units`), all-gathered just before its op and freed after it (and again in backward),
      so a device holds about one layer's full parameters at a time (FSDP2 prefetches the next);
      what no unit can own (tied weights, a module-level parameter such as a position table)
      goes in the root's group. `per_layer=False`: one group for the whole module, gathered
      whole for the forward and kept until the backward is done.
    - The parameters are sharded on dim 0 (FSDP2's default; `shard_placement_fn=` to change it):
      in replicate mode the `[K, out, in]` copies are split over the areas dimension.
    - `shard_feedback=True` (with `per_layer`): the fixed feedback matrices (as large as the
      weights) are sharded with their layer as frozen parameters (no gradient, same names);
      False, or `per_layer=False`, keeps them replicated buffers. The `kp` rule's feedback is a trainable parameter: sharded, its gradient
      reduce-scattered like a weight's.
    - `sync_module_states=True`: parameters and persistent buffers are broadcast from the mesh's
      first rank before sharding (FSDP2 itself keeps each rank's own values, DDP broadcasts).
    - The gates' local rule takes its statistics over the mesh's group (`sync_gates`); the routing
      counters stay per process (buffers: FSDP2 does not touch them), `routing_stats` sums them.
    - `mesh`: a `DeviceMesh` (default: 1-D over every process, on the module's device type);
      other keywords go to `fully_shard` (`reshard_after_forward`, `mp_policy`,
      `offload_policy`, ...).

    Train as usual: `opt = torch.optim.Adam(sal.parameters())` after this call (the optimizer must
    see the sharded parameters). Parameters and `state_dict()` values are DTensors; use
    `torch.distributed.checkpoint` (or `get_model_state_dict(..., full_state_dict=True)`) to save.
    """
    from .distributed import _count_names, sync_gates   # distributed re-exports this module
    shard, FSDPModule = _fsdp2()
    from .module import SALModule
    if isinstance(module, DistributedDataParallel) or hasattr(module, "_orig_mod"):
        raise SalcompileError(
            "fully_shard needs the module salcompile.transform returned, not a DDP or "
            "torch.compile wrapper: shard it first (compiling a sharded module is untested).")
    if isinstance(module, FSDPModule):
        raise SalcompileError("the module is already sharded (fully_shard was applied to it).")
    if not isinstance(module, SALModule):
        raise SalcompileError(f"fully_shard needs the module salcompile.transform returned, got "
                              f"{type(module).__name__}; call salcompile.transform(model, ...) "
                              f"first.")
    if not (dist.is_available() and dist.is_initialized()):
        raise SalcompileError(
            "fully_shard needs a torch.distributed process group, and none is initialised; call "
            "torch.distributed.init_process_group(...) in every process first (torchrun sets it "
            "up), or train the module directly in a single process.")
    if mesh is not None and not hasattr(mesh, "get_group"):
        raise SalcompileError(f"fully_shard: mesh must be a torch.distributed DeviceMesh "
                              f"(init_device_mesh(...)) or None, got {type(mesh).__name__}.")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        device = next(iter(module.parameters()), torch.empty(0)).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    group = _mesh_group(mesh)
    if sync_module_states:
        pg = mesh.get_group() if mesh.ndim == 1 else None
        src = dist.get_global_rank(pg, 0) if pg is not None else 0
        skip = set(_count_names(module)) | {n for n, _ in module.named_buffers()
                                           if n in _non_persistent(module)}
        on = (torch.device("cpu") if mesh.device_type == "cpu" else torch.device(
            mesh.device_type, torch.get_device_module(mesh.device_type).current_device()))
        with torch.no_grad():
            for n, t in [*module.named_parameters(), *module.named_buffers()]:
                if n in skip or t.is_meta:   # meta: deferred initialisation, nothing to send
                    continue
                if t.device == on:
                    dist.broadcast(t.data, src=src, group=pg)
                else:   # e.g. built on the host for a cuda mesh (nccl): one tensor at a time
                    moved = t.detach().to(on)
                    dist.broadcast(moved, src=src, group=pg)
                    t.data.copy_(moved)
    sync_gates(True, group)
    units = shard_units(module, shard_feedback=shard_feedback) if per_layer else []
    for name in units:
        shard(module.get_submodule(name), mesh=mesh, **fsdp_kwargs)
    shard(module, mesh=mesh, **fsdp_kwargs)
    return module


def _non_persistent(module: nn.Module) -> set:
    out = set()
    for prefix, sub in module.named_modules():
        for b in sub._non_persistent_buffers_set:
            out.add(f"{prefix}.{b}" if prefix else b)
    return out
