"""Example: data-parallel training of a transformed model, one process per device, under torchrun
(docs/distributed.md). Runs on CPU (gloo) as well as on GPUs (nccl):

    torchrun --standalone --nproc_per_node 2 examples/torchrun_ddp.py [--steps 30] [--areas 16]

Every rank transforms the same model with the same seeds (identical parameters, feedback matrices
and gate prototypes), wraps it with `salcompile.distributed.data_parallel` and trains on its shard
of a synthetic classification set (DistributedSampler, drop_last). At the end rank 0 prints the
global routing statistics (`sdist.routing_stats`: a collective, every rank calls it) and checks
that every rank holds the same parameters.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import salcompile
import salcompile.distributed as sdist


def dataset(n=512, features=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="rows per process and step")
    ap.add_argument("--areas", type=int, default=4)
    ap.add_argument("--feedback", default="fa")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--compile", action="store_true", help="salcompile.compile before wrapping")
    a = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)   # one thread per process on CPU

    data = dataset()
    torch.manual_seed(0)                                # the same seeds on every rank
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 4)).to(device)
    x_example = data.tensors[0][:a.batch].to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sal = salcompile.transform(model, example_inputs=(x_example,), areas=a.areas,
                                   feedback=a.feedback)
    if a.compile:
        sal = salcompile.compile(sal)                   # compile *before* wrapping
    ddp = sdist.data_parallel(sal, device_ids=[local] if cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=a.lr)

    sampler = torch.utils.data.DistributedSampler(data, drop_last=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch, sampler=sampler,
                                         drop_last=True)
    step, epoch, curve = 0, 0, []
    while step < a.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)                       # the loss over all ranks' rows
            curve.append(float(mean) / world)
            step += 1
            if step >= a.steps:
                break
        epoch += 1

    stats = sdist.routing_stats(ddp)                    # collective: every rank calls it
    # every rank must hold the same parameters: compare each with rank 0's
    flat = torch.cat([p.detach().reshape(-1).double() for p in ddp.module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    drift = (flat - ref).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    k = max(1, min(3, len(curve) // 3))
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k   # means of the first / last k steps
    if rank == 0:
        print(f"world {world}, {step} steps, loss {first:.4f} -> {last:.4f} "
              f"(means of the first and last {k} steps)")
        for gate, s in stats.items():
            print(f"{gate}: {s['rows']} rows over all ranks, {s['active']} areas used, "
                  f"balance {s['balance']:.3f}")
        print(f"max parameter difference between ranks: {float(drift):.3g}")
    ok = float(drift) == 0.0 and last < first
    # teardown: DDP (its reducer holds the process group) goes first, then every rank leaves
    # together; with gloo, a DDP object outliving destroy_process_group can hang at exit
    del ddp, opt
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(f"rank {rank}: ranks disagree or the loss did not fall")


if __name__ == "__main__":
    main()
