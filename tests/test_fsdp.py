"""FSDP2 (torch.distributed.fsdp.fully_shard, gloo, 2 CPU processes) trains a transformed model
exactly as one process on the concatenated batch: `salcompile.distributed.fully_shard`, per layer
(weights, biases and feedback matrices sharded on dim 0) or as one group."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import salcompile
from conftest import join_gloo, run_workers
import salcompile.distributed as sdist
import salcompile.models as models
from salcompile.errors import SalcompileError
from salcompile.models import MLP

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:   # torch < 2.6
    FSDPModule = None

pytestmark = pytest.mark.skipif(not dist.is_available() or FSDPModule is None,
                                reason="torch.distributed / FSDP2 unavailable")

D = torch.float64
WORLD, ROWS, STEPS = 2, 4, 3   # 2 ranks x 4 rows vs 1 process x 8 rows
TIMEOUT_S = 120
CASES = {   # name: (SALConfig fields, sdist.fully_shard keywords, optimizer)
    "fa_dense": (dict(areas=1), {}, "sgd"),
    "sal4_replicate": (dict(areas=4, area_mode="replicate"), {}, "sgd"),
    "sal4_replicate_one_group": (dict(areas=4, area_mode="replicate"), dict(per_layer=False),
                                 "sgd"),
    "sal4_replicate_feedback_buffers": (dict(areas=4, area_mode="replicate"),
                                        dict(shard_feedback=False), "sgd"),
    "sal4_partition": (dict(areas=4, area_mode="partition"), {}, "adam"),
    "sal4_replicate_kp": (dict(areas=4, area_mode="replicate", feedback="kp"), {}, "sgd"),
    "dfa_dense": (dict(areas=1, feedback="dfa"), {}, "sgd"),
    "usf_dense": (dict(areas=1, feedback="usf"), {}, "sgd"),   # B derived from W in the unit
    "sal4_shared_path": (dict(areas=4, shared_fraction=0.5), {}, "sgd"),   # 2 ops per unit
    # a tiny GPT (embeddings, attention, layer norms, a module-level position table), replicate
    "gpt_sal4_replicate": (dict(areas=4, area_mode="replicate", zoo="gpt"), {}, "adam"),
}


def _data(zoo=None):
    g = torch.Generator().manual_seed(1)
    if zoo:   # tokens, and a regression target on the logits
        torch.manual_seed(1)
        xs = models.example_input(zoo, batch=STEPS * WORLD * ROWS, **models.REGISTRY[zoo].tiny)
        return xs.view(STEPS, WORLD * ROWS, *xs.shape[1:]), None
    return (torch.randn(STEPS, WORLD * ROWS, 8, dtype=D, generator=g),
            torch.randint(0, 3, (STEPS, WORLD * ROWS), generator=g))


def _model(fields, xs):
    fields = dict(fields)
    zoo = fields.pop("zoo", None)
    torch.manual_seed(0)
    model = (models.build(zoo, **models.REGISTRY[zoo].tiny) if zoo else MLP(8, 16, 3, depth=3))
    return salcompile.transform(model.to(D), (xs[0, :ROWS],), **fields)


def _train(model, xs, ys, rows, optimizer):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=0.1) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=1e-2))
    for step, x in enumerate(xs[:, rows]):
        opt.zero_grad()
        out = model(x)
        loss = out.pow(2).mean() if ys is None else F.cross_entropy(out, ys[step, rows])
        loss.backward()
        opt.step()


def _full(value):
    value = value.full_tensor() if hasattr(value, "full_tensor") else value
    return value.detach().clone()


def _worker(rank, store, out):
    join_gloo(rank, store, out, WORLD, TIMEOUT_S)   # tests/conftest.py
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    results = {}
    for name, (fields, kw, optimizer) in CASES.items():
        xs, ys = _data(fields.get("zoo"))
        sal = _model(fields, xs)
        sharded = sdist.fully_shard(sal, **kw)
        assert sharded is sal
        groups = sorted(n for n, m in sal.named_modules() if isinstance(m, FSDPModule))
        local = {n: tuple(p.to_local().shape) for n, p in sal.named_parameters()}
        units = [n for n in groups if n]
        calls = [n.target for n in sal.graph.nodes if n.op == "call_module" and n.target in units]
        first = calls[0] if calls else "layers.0"
        seen = []

        def first_sharded(*args):
            seen.append(isinstance(next(sal.get_submodule(first).parameters()), DTensor))
        if calls:   # while the last unit runs, is the first one's full weight freed again?
            hook = sal.get_submodule(calls[-1]).register_forward_pre_hook(first_sharded)
        else:   # one group, kept unsharded from the root's forward to its backward
            hook = sal.register_forward_hook(first_sharded)
        _train(sal, xs, ys, rows, optimizer)
        hook.remove()
        results[name] = dict(state={n: _full(v) for n, v in sal.state_dict().items()},
                             groups=groups, local=local, stats=sdist.routing_stats(sal),
                             kinds={n: p.requires_grad for n, p in sal.named_parameters()},
                             first_sharded_at_last=seen[0],
                             root_params=[n for n, _ in sal.named_parameters()
                                          if not any(n.startswith(u + ".") for u in units)])
    sdist.sync_gates()
    if rank == 0:
        torch.save(results, out + ".tmp")
        os.replace(out + ".tmp", out)
    dist.barrier()
    open(f"{out}.rank{rank}.done", "w").close()
    os._exit(0)   # as tests/test_distributed.py: gloo's teardown can abort once the peer is gone


@pytest.fixture(scope="module")
def fsdp_results():
    return run_workers(_worker, WORLD, TIMEOUT_S, "FSDP")


def _single_process(name):
    fields, _, optimizer = CASES[name]
    xs, ys = _data(fields.get("zoo"))
    sal = _model(fields, xs)
    _train(sal, xs, ys, slice(None), optimizer)
    return sal


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_equals_one_process_on_the_concatenated_batch(fsdp_results, name):
    got = fsdp_results[name]
    sal = _single_process(name)
    state = sal.state_dict()
    assert got["state"].keys() == state.keys()   # the same names, feedback included
    for n, v in state.items():
        if not n.endswith(".counts"):   # the routing counters: per process, summed below
            torch.testing.assert_close(got["state"][n], v, rtol=1e-10, atol=1e-10, msg=n)
    counts = {g: s["counts"] for g, s in salcompile.routing_stats(sal).items()}
    assert {g: s["counts"] for g, s in got["stats"].items()} == counts


@pytest.mark.parametrize("name", list(CASES))
def test_what_is_sharded(fsdp_results, name):
    got = fsdp_results[name]
    fields, kw, _ = CASES[name]
    per_layer = kw.get("per_layer", True)
    # per layer: while the last layer runs, the first one's full weight is freed again
    assert got["first_sharded_at_last"] is per_layer
    if fields.get("zoo"):
        assert len(got["groups"]) > 8 and got["root_params"] == ["pos"]
        return
    assert got["root_params"] == ([] if per_layer else list(got["kinds"]))
    layers = {"layers.0", "layers.1", "layers.2"}
    gates = {"sal_gates.gate_0"} if fields["areas"] > 1 else set()
    assert set(got["groups"]) == ({""} | layers | gates if per_layer else {""})
    # every parameter is a DTensor sharded on dim 0 over the 2 ranks: 16 outputs -> 8 each;
    # replicate mode's [K=4, 16] copies -> 2 areas each
    replicate = fields.get("area_mode") == "replicate"
    assert got["local"]["layers.1.bias"] == ((2, 16) if replicate else (8,))
    assert got["local"]["layers.1.weight"] == ((2, 16, 16) if replicate else (8, 16))
    fb = "layers.1.weight_feedback"
    if fields.get("feedback") == "kp":
        assert got["kinds"][fb] is True                  # trained: a parameter anyway
    elif fields.get("feedback") in ("dfa", "usf"):   # D: one op for all layers; usf: no B stored
        assert fb not in got["kinds"]
    elif per_layer and kw.get("shard_feedback", True):
        assert got["kinds"][fb] is False                 # a frozen parameter, sharded
        assert got["local"][fb][0] == got["local"]["layers.1.weight"][0]
    else:
        assert fb not in got["kinds"]                    # a replicated buffer


# ------------------------------------------------------------------ without spawning processes
UNIT_CASES = [dict(areas=1), dict(areas=4, area_mode="replicate"), dict(areas=4),
              dict(areas=4, shared_fraction=0.5), dict(areas=4, route_top_k=2),
              dict(areas=4, area_mode="replicate", feedback="kp"), dict(areas=1, feedback="usf"),
              dict(areas=4, feedback="dfa"), dict(areas=4, area_mode="replicate", zoo="gpt"),
              dict(areas=4, area_mode="replicate", zoo="resnet20")]


@pytest.mark.parametrize("fields", UNIT_CASES, ids=lambda f: "-".join(map(str, f.values())))
def test_shard_units_keeps_values_gradients_and_names(fields, compact_regions):
    zoo = fields.get("zoo")
    if zoo:
        x = models.example_input(zoo, batch=3, **models.REGISTRY[zoo].tiny)
        x = x.to(D) if x.is_floating_point() else x
    else:
        x = torch.randn(6, 8, dtype=D)
    ref, sal = _model(fields, x[None]), _model(fields, x[None])
    units = sdist.shard_units(sal)
    named = dict(sal.named_parameters())
    assert all(any(n.startswith(u + ".") for u in units) for n in named if n != "pos")
    assert all(isinstance(sal.get_submodule(u), sdist.ShardUnit) for u in units)
    assert sal.state_dict().keys() == ref.state_dict().keys()
    outs = []
    for m in (ref, sal):
        out = m(x)
        out.pow(2).mean().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in named.items():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[n]), n
        else:   # a fixed feedback matrix, now a frozen parameter
            assert n.endswith("_feedback") and p.grad is None and n not in grads
    assert salcompile.routing_stats(sal) == salcompile.routing_stats(ref)


def test_fully_shard_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    sal = _model(dict(areas=1), torch.randn(1, 4, 8, dtype=D))
    with pytest.raises(SalcompileError, match="init_process_group"):
        sdist.fully_shard(sal)


def test_fully_shard_needs_a_transformed_module():
    with pytest.raises(SalcompileError, match="salcompile.transform"):
        sdist.fully_shard(torch.nn.Linear(2, 2))
    sal = _model(dict(areas=1), torch.randn(1, 4, 8, dtype=D))
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = sal
    with pytest.raises(SalcompileError, match="wrapper"):
        sdist.fully_shard(compiled_like)


def test_fully_shard_without_fsdp2(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_fsdp2(name, *args, **kwargs):
        if name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_fsdp2)
    with pytest.raises(SalcompileError, match="FSDP2"):
        sdist.fully_shard(torch.nn.Linear(2, 2))


def test_world_of_one_trains_as_unsharded_and_refuses_twice(world_of_one):
    xs, ys = _data()
    fields = dict(areas=4, area_mode="replicate")
    ref, sal = _model(fields, xs), _model(fields, xs)
    with pytest.raises(SalcompileError, match="DeviceMesh"):
        sdist.fully_shard(sal, mesh="cpu")
    sdist.fully_shard(sal)
    with pytest.raises(SalcompileError, match="already sharded"):
        sdist.fully_shard(sal)
    with pytest.raises(SalcompileError, match="FSDP2's hooks"):
        salcompile.compile(sal)
    _train(ref, xs, ys, slice(None), "adam")
    _train(sal, xs, ys, slice(None), "adam")
    for n, v in ref.state_dict().items():
        torch.testing.assert_close(_full(sal.state_dict()[n]), v, rtol=1e-12, atol=1e-12, msg=n)


def _doc_snippet(path, marker):
    """The first ```python block after `marker` in a markdown file."""
    text = open(path).read()
    rest = text[text.index(marker):]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start:rest.index("```", start)]


def test_fsdp_doc_snippet_runs_under_torchrun_on_cpu(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "train_fsdp.py"
    script.write_text(_doc_snippet(os.path.join(root, "docs", "distributed.md"),
                                   "The recipe, runnable as it stands on CPU"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script)]
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # each rank: 2 of K=4 (one string per print: the two ranks share one stdout pipe)
    assert r.stdout.count("stores (2, 256, 256) of (4, 256, 256)") == 2, r.stdout
    assert "unsharded copy, max difference: 0.0" in r.stdout
