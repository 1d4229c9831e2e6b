"""DistributedDataParallel (gloo, 2 CPU processes) trains a transformed model exactly as one process
on the concatenated batch: parameters (the gates' P included) and the routing counters."""
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import salcompile
from conftest import join_gloo, run_workers
import salcompile.distributed as sdist
from salcompile.models import MLP
from salcompile.ops.gate import local_rule_grad, route

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

D = torch.float64
WORLD, ROWS, STEPS, LR = 2, 4, 3, 0.1   # 2 ranks x 4 rows vs 1 process x 8 rows
TIMEOUT_S = 120
CASES = {   # name: (SALConfig fields, how the rank wraps it)
    "fa_dense": (dict(areas=1), "ddp"),
    "sal4_partition": (dict(areas=4, area_mode="partition"), "ddp"),
    "sal4_replicate_broadcast": (dict(areas=4, area_mode="replicate"), "helper"),
    "sal4_dfa": (dict(areas=4, feedback="dfa"), "ddp"),
    "sal4_kp": (dict(areas=4, feedback="kp"), "ddp"),   # B a parameter: its gradient is averaged
    "usf_dense": (dict(areas=1, feedback="usf"), "ddp"),
    # controls: per-shard gate statistics (P drifts); DDP's forward buffer sync clobbers counts
    "sal4_unsynced": (dict(areas=4, area_mode="partition"), "unsynced"),
    "sal4_plain_ddp_sync": (dict(areas=4, area_mode="partition"), "plain"),
}
CONTROLS = ("sal4_unsynced", "sal4_plain_ddp_sync")
# torch >= 2.13 deprecates broadcast_buffers for forward_sync_buffers (buffers then still synced
# once at init, which is harmless: the counters start at zero)
NO_FORWARD_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, WORLD * ROWS, 8, dtype=D, generator=g),
            torch.randint(0, 3, (STEPS, WORLD * ROWS), generator=g))


def _model(fields, xs):
    torch.manual_seed(0)
    return salcompile.transform(MLP(8, 16, 3, depth=3).to(D), (xs[0, :ROWS],), **fields)


def _train(model, sal, xs, ys, rows):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in zip(xs[:, rows], ys[:, rows]):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in sal.named_parameters()}


def _worker(rank, store, out):
    join_gloo(rank, store, out, WORLD, TIMEOUT_S)   # tests/conftest.py
    xs, ys = _data()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    results = {}
    for name, (fields, wrap) in CASES.items():
        sal = _model(fields, xs)
        sdist.sync_gates(enabled=wrap != "unsynced")
        if wrap == "helper":   # counters excluded from the buffer syncs: True is safe
            model = sdist.data_parallel(sal, forward_sync_buffers=True)
        elif wrap == "plain":  # DDP's default: rank 0's buffers copied over at every forward
            model = DistributedDataParallel(sal)
        else:
            model = DistributedDataParallel(sal, **NO_FORWARD_SYNC)
        params = _train(model, sal, xs, ys, rows)
        local = {g: s["counts"] for g, s in salcompile.routing_stats(sal).items()}
        every = [None] * WORLD
        dist.all_gather_object(every, local)
        results[name] = dict(params=params, local=every, stats=sdist.routing_stats(model),
                             after=salcompile.routing_stats(sal))
    sdist.sync_gates()
    if rank == 0:
        torch.save(results, out + ".tmp")
        os.replace(out + ".tmp", out)
    dist.barrier()   # every collective of both ranks is done: the results are final
    open(f"{out}.rank{rank}.done", "w").close()
    # Leave without tearing gloo down: its teardown can abort (SIGABRT) when the peer has
    # already gone, which says nothing about the numbers under test.
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_results():
    return run_workers(_worker, WORLD, TIMEOUT_S, "DDP")


def _single_process(fields):
    xs, ys = _data()
    sal = _model(fields, xs)
    params = _train(sal, sal, xs, ys, slice(None))
    return params, {g: s["counts"] for g, s in salcompile.routing_stats(sal).items()}


@pytest.mark.parametrize("name", [n for n in CASES if n not in CONTROLS])
def test_ddp_equals_one_process_on_the_concatenated_batch(ddp_results, name):
    got = ddp_results[name]
    params, counts = _single_process(CASES[name][0])
    assert got["params"].keys() == params.keys()
    for n, p in params.items():
        torch.testing.assert_close(got["params"][n], p, rtol=1e-10, atol=1e-10, msg=n)
    if CASES[name][0]["areas"] > 1:
        assert any(n.startswith("sal_gates.") for n in params)
        assert counts["gate_0"] == [sum(c) for c in zip(*(r["gate_0"] for r in got["local"]))]
        assert sum(counts["gate_0"]) == STEPS * WORLD * ROWS
    assert {g: s["counts"] for g, s in got["stats"].items()} == counts   # global routing stats
    # routing_stats left the local counters as they were
    assert {g: s["counts"] for g, s in got["after"].items()} == got["local"][0]


def test_unsynchronised_gates_would_differ(ddp_results):
    """Control: with the gates' statistics per shard, P (and so the routing) drifts."""
    got = ddp_results["sal4_unsynced"]["params"]
    params, _ = _single_process(CASES["sal4_unsynced"][0])
    assert (got["sal_gates.gate_0.proj"] - params["sal_gates.gate_0.proj"]).abs().max() > 1e-8


def test_ddp_forward_buffer_sync_would_clobber_the_counters(ddp_results):
    """Control: plain DDP(sal) copies rank 0's counters over rank 1's before every forward; the
    parameters are still right (the gates synchronise themselves), the counts are not."""
    got = ddp_results["sal4_plain_ddp_sync"]
    params, counts = _single_process(CASES["sal4_plain_ddp_sync"][0])
    for n, p in params.items():
        torch.testing.assert_close(got["params"][n], p, rtol=1e-10, atol=1e-10, msg=n)
    assert got["stats"]["gate_0"]["counts"] != counts["gate_0"]   # rank 1: 2 of rank 0's steps


# ------------------------------------------------------------------ without spawning processes
def _gate_case(t=13, f=6, r=5, k=4, dtype=D):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(t, f, dtype=dtype, generator=g)
    proj = torch.randn(r, f, dtype=dtype, generator=g)
    protos = F.normalize(torch.randn(k, r, dtype=dtype, generator=g), dim=1)
    return feats, proj, protos, route(feats, proj, protos)


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_world_of_one_gives_the_one_process_gradient_bit_for_bit(world_of_one, dtype):
    case = _gate_case(dtype=dtype)
    before = torch.ops.salcompile.global_route_counts(torch.tensor([1.0, 2.0], dtype=D))
    assert before.tolist() == [1.0, 2.0, 1.0]          # [counts over the group, world size]
    with_group = local_rule_grad(*case, 0.1, 1.0)
    sdist.sync_gates(enabled=False)                    # as if no process group
    without = local_rule_grad(*case, 0.1, 1.0)
    assert torch.equal(with_group, without)


def test_shards_with_global_statistics_average_to_the_full_batch_gradient():
    """The rule DDP relies on, with the all_reduce written out: each shard's gradient, with the
    group's counts and scaled by world/N_global, averages to the full batch's."""
    feats, proj, protos, area = _gate_case(t=12)
    full = local_rule_grad(feats, proj, protos, area, 0.1, 1.0)
    k = protos.shape[0]
    shards = [slice(0, 5), slice(5, 12)]              # unequal shards: 5 and 7 rows
    counts = F.one_hot(area, k).to(D).sum(0)
    parts = []
    for s in shards:
        fake = torch.cat([counts, counts.new_full((1,), float(len(shards)))])
        with _patched_counts(fake):
            parts.append(local_rule_grad(feats[s], proj, protos, area[s], 0.1, 1.0))
    torch.testing.assert_close(sum(parts) / len(parts), full, rtol=1e-12, atol=1e-14)


def test_global_route_counts_op_passes_opcheck():
    torch.library.opcheck(torch.ops.salcompile.global_route_counts.default,
                          (torch.tensor([3.0, 0.0, 5.0], dtype=D),))


class _patched_counts:
    """Stand in for the all_reduce: the gate module's op returns fixed global statistics."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        import salcompile.ops.gate as gate
        self.gate, self.saved = gate, gate.global_route_counts
        gate.global_route_counts = lambda counts: self.value
        return self

    def __exit__(self, *exc):
        self.gate.global_route_counts = self.saved


def test_routing_stats_unwraps_and_falls_back_to_one_process():
    x = torch.randn(6, 8, dtype=D)
    torch.manual_seed(0)
    sal = salcompile.transform(MLP(8, 16, 3, depth=3).to(D), (x,), areas=4)
    sal(x)
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = sal
    assert sdist.unwrap(compiled_like) is sal
    assert sdist.routing_stats(sal) == salcompile.routing_stats(sal)
    assert sdist.routing_stats(sal)["gate_0"]["rows"] == 6
    sdist.reset_routing_stats(compiled_like)
    assert salcompile.routing_stats(sal)["gate_0"]["rows"] == 0


def test_ignore_routing_counts_names_the_counters():
    x = torch.randn(6, 8, dtype=D)
    sal = salcompile.transform(MLP(8, 16, 3, depth=3).to(D), (x,), areas=4)
    sdist.ignore_routing_counts(sal)
    assert sal._ddp_params_and_buffers_to_ignore == ["sal_gates.gate_0.counts"]
