"""One SGD training step (forward, backward, optimizer step) of a deep ReLU MLP under every mode.

    python benchmarks/step_time.py [--device cpu|cuda] [--rows N] [--quick] [--rounds R]
    python benchmarks/step_time.py --billion [--rows N] [--steps 50]      # CUDA, bf16, 1.68 B SAL
    python benchmarks/step_time.py --paper-scale [--device cpu|cuda]     # 64-256-10 MLP, batch 16
    python benchmarks/step_time.py --fused-vs-unfused [--rows N]   # top-k, shared path: fused?

Model `din -> L x D -> dout` (salcompile.models.DeepMLP, ReLU, cross-entropy on random labels):
  CPU : 4096 rows, 256 -> 5 x 1024 -> 256, fp32;
  CUDA: 16384 rows, 1024 -> 7 x 4096 -> 1024, bf16 (model and data).
Variants: dense BP eager (the original nn.Module), dense BP torch.compile, FA (transform areas=1),
FA compiled (salcompile.compile), SAL partition K=16 (FA; regions fused into area-sorted compact
form, the default), the same with fuse_regions=False (one self-contained area op per layer), SAL
replicate K=16 (FA), SAL partition K=16 compiled. Each variant is built, warmed up and then timed in interleaved rounds (every round
runs every variant once per step-slot) so drift on a shared machine hits all alike; a variant that
fails to build or run becomes a row with its error. Peak memory:
  CUDA: torch.cuda.max_memory_allocated over the warm-up + timed steps;
  CPU : bytes of parameters and buffers + the peak of live allocations during one step, from the
        torch profiler's allocator events (profile_memory=True; tracemalloc cannot see torch).
Also times salcompile.transform on a ResNet-50-sized graph (built here: 16 bottlenecks, 53 convs,
batch norm; torchvision is not a dependency) and profiles the SAL partition step (top ops).
Writes benchmarks/results/step_time_<device>.md (or --out).

--paper-scale: the paper's own setting, where a step is bound by per-op overhead, not arithmetic:
salcompile.models.MLP(64, 256, 10) (the zoo's "mlp"), batch 16, Adam lr 1e-3, one thread on the
CPU; dense BP eager / compiled, FA eager / compiled, SAL-16 partition eager / compiled, SAL-16
replicate, SAL-16 partition with its fused region as compact ops one by one (the few-rows
region path off: salcompile/ops/fast_region.py), and SAL-16 partition with the eager fast path
off in its forward (salcompile/ops/fast.py: every custom op through the dispatcher, as before
issue 13; the ops' cheaper internals stay); then dense BP, FA and SAL-16 partition eager once
more, each step's phases (zero_grad, forward, loss, backward, optimizer step) timed one by one.
Interleaved rounds of --steps-per-round
steps per variant; median of the per-round means. Writes step_time_paper_scale[_cuda].md.

--billion: salcompile.models.build("replicate-1b") with REGISTRY["replicate-1b"].sal in bf16 on
CUDA, `--steps` SGD steps on a synthetic learnable task (labels = argmax of a fixed random
projection of x), beside the same model with areas=1 (same active size); prints loss and median
step time and writes step_time_billion.md.
"""
from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import salcompile
from salcompile.files import atomic_write_text
from salcompile.models import MLP, DeepMLP

TARGETS_CPU = {  # the targets, ratio of median step time to dense BP eager (memory: peak)
    "FA (areas=1)": "<= 1.05x",
    "SAL partition K=16": "<= 0.025x time, <= 0.5x peak memory",
    "SAL replicate K=16": "<= 1.3x",
}
TARGETS_CUDA = {
    "FA (areas=1)": "<= 1.02x",
    "SAL partition K=16": "<= 0.06x",
    "SAL replicate K=16": "<= 1.10x",
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return msg[:300] + ("..." if len(msg) > 300 else "")


class Runner:
    """One variant: module, SGD (or Adam) optimizer, step timing."""

    def __init__(self, label, module, x, y, lr=1e-3, optimizer=torch.optim.SGD):
        self.label, self.module, self.x, self.y = label, module, x, y
        self.opt = optimizer([p for p in module.parameters() if p.requires_grad], lr=lr)
        self.times = []
        self.error = None
        self.first_step_s = None
        self.peak = None
        self.peak_how = ""

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.module(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def timed_step(self, device):
        _sync(device)
        t0 = time.perf_counter()
        self.step()
        _sync(device)
        return time.perf_counter() - t0

    def time_round(self, device, steps: int) -> None:
        """One timing round: `steps` steps, their mean time appended to self.times."""
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(device)
        self.times.append((time.perf_counter() - t0) / steps)


PHASES = ("zero_grad", "forward", "loss", "backward", "optimizer step")


def phase_round(r: Runner, device, steps: int, into: dict) -> None:
    """`steps` steps of r, each phase timed on its own (sync'd); the round's mean per phase is
    appended to into[r.label][phase]."""
    sums = dict.fromkeys(PHASES, 0.0)
    for _ in range(steps):
        marks = [time.perf_counter()]
        r.opt.zero_grad(set_to_none=True)
        _sync(device)
        marks.append(time.perf_counter())
        out = r.module(r.x)
        _sync(device)
        marks.append(time.perf_counter())
        loss = F.cross_entropy(out, r.y)
        _sync(device)
        marks.append(time.perf_counter())
        loss.backward()
        _sync(device)
        marks.append(time.perf_counter())
        r.opt.step()
        _sync(device)
        marks.append(time.perf_counter())
        for name, a, b in zip(PHASES, marks, marks[1:]):
            sums[name] += b - a
    for name in PHASES:
        into.setdefault(r.label, {}).setdefault(name, []).append(sums[name] / steps)


def interleave(runners, rounds: int, budget_end, one_round, start=None) -> None:
    """`rounds` timing rounds, each running one_round(r) for every runner in turn (drift on a
    shared machine hits all alike); a runner that fails is marked and skipped; past `budget_end`
    (after one round at least) the rounds stop."""
    for rnd in range(rounds):
        if budget_end and time.perf_counter() > budget_end and rnd >= 1:
            print(f"--budget exhausted after {rnd} rounds", flush=True)
            break
        for r in runners:
            if r.error:
                continue
            try:
                one_round(r)
            except Exception as exc:  # noqa: BLE001
                r.error = _short(exc)
                print(f"FAILED {r.label} while timing: {r.error}", flush=True)
        if start is not None:
            print(f"round {rnd + 1}/{rounds} done ({time.perf_counter() - start:.0f} s)",
                  flush=True)


def count_params(module) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def state_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def cpu_step_peak(runner: Runner) -> int:
    """Peak bytes live during one step above the level at its start, from allocator events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nb in events:
        live += nb
        peak = max(peak, live)
    return peak


def profile_top(runner: Runner, device, rows=12) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runner.step()
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(2):
            runner.step()
        _sync(device)
    wall = (time.perf_counter() - t0) / 2 * 1e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"profiled wall time {wall:.1f} ms/step (timed median without the profiler: "
            f"{statistics.median(runner.times) * 1e3:.1f} ms; a large gap means other load on the "
            f"machine during profiling)\n"
            + prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


# ---------------------------------------------------------------- ResNet-50-sized graph
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet50Like(nn.Module):
    """ResNet-50 layout: stem conv 7x7/2 + maxpool, stages [3, 4, 6, 3] of bottlenecks (mid widths
    64/128/256/512, out 256..2048), global pool, fc. 53 convs, 53 BN, 25.6 M params (1000 classes)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def transform_timing(lines_out: list, image=64):
    model = ResNet50Like()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_block = sum(isinstance(m, Bottleneck) for m in model.modules())
    x = torch.randn(2, 3, image, image)
    rows = []
    t0 = time.perf_counter()
    try:
        torch.export.export(copy.deepcopy(model), (x,), strict=False)
        rows.append(("torch.export.export alone (capture, for reference)", time.perf_counter() - t0, ""))
    except Exception as exc:  # noqa: BLE001
        rows.append(("torch.export.export alone", None, _short(exc)))
    for label, kw in (("salcompile.transform(model, (x,), areas=1)", dict(areas=1)),
                      ("salcompile.transform(model, (x,), areas=16)", dict(areas=16)),
                      ("salcompile.transform(model, areas=1) (symbolic_trace, no example)",
                       dict(areas=1, _noex=True))):
        noex = kw.pop("_noex", False)
        t0 = time.perf_counter()
        try:
            sal = salcompile.transform(model, **kw) if noex else salcompile.transform(model, (x,), **kw)
            dt = time.perf_counter() - t0
            plan = salcompile.plan(sal)
            n_layers = len(getattr(plan, "layers", []) or [])
            rows.append((label, dt, f"{n_layers} layers rewritten" if n_layers else ""))
        except Exception as exc:  # noqa: BLE001
            rows.append((label, None, _short(exc)))
    lines_out += [f"ResNet-50-sized graph: {n_block} bottleneck blocks, {n_conv} convs, "
                  f"{sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())} batch norms, "
                  f"{count_params(model):,} params; example input {tuple(x.shape)}. Target: < 2 s.", "",
                  "| call | seconds | vs target < 2 s | note |", "|---|---|---|---|"]
    for label, dt, note in rows:
        ok = "" if dt is None else ("met" if dt < 2 else "missed")
        lines_out.append(f"| {label} | {'failed' if dt is None else f'{dt:.2f}'} | {ok} | {note} |")
    return rows


# ---------------------------------------------------------------- main benchmark
def build_variants(model, x, device, budget_end):
    def fresh():
        return copy.deepcopy(model)

    specs = [
        ("dense BP eager", lambda: fresh()),
        ("dense BP compiled", lambda: torch.compile(fresh())),
        ("FA (areas=1)", lambda: salcompile.transform(fresh(), (x,), feedback="fa", areas=1)),
        ("FA compiled", lambda: salcompile.compile(
            salcompile.transform(fresh(), (x,), feedback="fa", areas=1))),
        ("SAL partition K=16", lambda: salcompile.transform(
            fresh(), (x,), feedback="fa", areas=16, area_mode="partition")),
        ("SAL partition K=16 unfused", lambda: salcompile.transform(
            fresh(), (x,), feedback="fa", areas=16, area_mode="partition", fuse_regions=False)),
        ("SAL replicate K=16", lambda: salcompile.transform(
            fresh(), (x,), feedback="fa", areas=16, area_mode="replicate")),
        ("SAL partition K=16 compiled", lambda: salcompile.compile(salcompile.transform(
            fresh(), (x,), feedback="fa", areas=16, area_mode="partition"))),
    ]
    return specs


def run_benchmark(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if cuda:
        din, width, hidden, dout, dtype, rows = 1024, 4096, 7, 1024, torch.bfloat16, 16384
    else:
        din, width, hidden, dout, dtype, rows = 256, 1024, 5, 256, torch.float32, 4096
    if args.quick:
        rows = 512 if not cuda else 4096
    rows = args.rows or rows
    rounds = args.rounds or (3 if args.quick else (10 if cuda else 12))
    per_round = args.per_round or (3 if cuda else 1)
    warmup = 2
    start = time.perf_counter()
    budget_end = start + args.budget if args.budget else None

    model = DeepMLP(din, width, dout, depth=hidden + 1).to(device=device, dtype=dtype)
    x = torch.randn(rows, din, device=device, dtype=dtype)
    y = torch.randint(0, dout, (rows,), device=device)

    runners, failed = [], []
    for label, make in build_variants(model, x, device, budget_end):
        if budget_end and time.perf_counter() > budget_end:
            failed.append((label, "skipped: --budget exhausted before it was built"))
            continue
        t0 = time.perf_counter()
        try:
            module = make()
            r = Runner(label, module, x, y)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device) if cuda else 0
            r.step()
            _sync(device)
            r.first_step_s = time.perf_counter() - t0
            for _ in range(warmup - 1):
                r.step()
            _sync(device)
            if cuda:
                # includes everything allocated on the device by then (other variants' weights too):
                # report the part above what was allocated before this variant was built.
                r.peak = torch.cuda.max_memory_allocated(device) - base_alloc + state_bytes(module)
                r.peak_how = "cuda max_memory_allocated"
            else:
                r.peak = state_bytes(module) + cpu_step_peak(r)
                r.peak_how = "params+buffers + profiler step peak"
            runners.append(r)
            print(f"built {label}: first step (incl. transform/compile) {r.first_step_s:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"FAILED {label}: {_short(exc)}", flush=True)
            traceback.print_exc()
            failed.append((label, _short(exc)))
            if cuda:
                torch.cuda.empty_cache()

    if cuda:  # the per-variant peak above, measured while earlier variants were resident
        pass
    def one_round(r):
        for _ in range(per_round):
            r.times.append(r.timed_step(device))

    interleave(runners, rounds, budget_end, one_round, start)

    base = next((r for r in runners if r.label == "dense BP eager" and r.times), None)
    base_ms = statistics.median(base.times) * 1e3 if base else None
    base_peak = base.peak if base else None
    targets = TARGETS_CUDA if cuda else TARGETS_CPU
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())

    cmd = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines = [f"# Training step time: dense BP vs FA vs SAL ({args.device})", "",
             f"- command: `{cmd}`",
             f"- torch {torch.__version__}, Python {platform.python_version()}, device: {dev_name}, "
             f"threads: {torch.get_num_threads()}",
             f"- model: DeepMLP {din} -> {hidden} x {width} -> {dout}, ReLU, {str(dtype).replace('torch.', '')}, "
             f"{rows} rows, cross-entropy, SGD lr 1e-3; one step = zero_grad + forward + backward + step",
             f"- timing: {warmup} warm-up steps per variant, then {rounds} interleaved rounds x {per_round} "
             f"step(s); median of all timed steps (and the fastest step, less sensitive to other load on a shared machine)" + (" (cuda.synchronize around each step)" if cuda else ""),
             "- peak memory: " + ("torch.cuda.max_memory_allocated during warm-up steps, minus what was "
                                   "allocated before the variant was built, plus its own params/buffers"
                                   if cuda else
                                   "bytes of the variant's parameters + buffers, plus the peak of live bytes "
                                   "allocated during one step from the torch profiler's allocator events "
                                   "(profile_memory=True); process RSS is not used (it is monotonic and "
                                   "shared with compile work)"),
             "", "| variant | median ms/step | vs dense BP eager | min ms/step | min vs dense min | peak memory MiB | "
                 "vs dense | params | first step s (incl. transform/compile) | target | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for r in runners:
        if r.error or not r.times:
            lines.append(f"| {r.label} | failed | | | | | | {count_params(r.module):,} | | "
                         f"{targets.get(r.label, '')} | error: {r.error} |")
            continue
        ms = statistics.median(r.times) * 1e3
        ratio = ms / base_ms if base_ms else float("nan")
        mem = r.peak / 2**20 if r.peak is not None else float("nan")
        mem_ratio = r.peak / base_peak if base_peak else float("nan")
        results[r.label] = (ms, ratio, mem_ratio)
        mn = min(r.times) * 1e3
        mn_ratio = mn / (min(base.times) * 1e3) if base else float("nan")
        lines.append(f"| {r.label} | {ms:.1f} | {ratio:.3f} | {mn:.1f} | {mn_ratio:.3f} | {mem:.0f} | {mem_ratio:.2f} | "
                     f"{count_params(r.module):,} | {r.first_step_s:.1f} | {targets.get(r.label, '')} | "
                     f"{len(r.times)} |")
    for label, err in failed:
        lines.append(f"| {label} | failed | | | | | | | | {targets.get(label, '')} | {err} |")

    # Verdict against the targets.
    lines += ["", "## Against the issue's targets", ""]
    mins = {r.label: min(r.times) for r in runners if r.times and not r.error}

    def verdict(label, key, limit, what="time"):
        if label not in results:
            return f"- {label}: no measurement (failed or skipped)"
        val = results[label][1 if what == "time" else 2]
        line = f"- {label} {what}: {val:.3f}x dense BP eager, target <= {limit}x: {'met' if val <= limit else 'MISSED'}"
        if what == "time" and base and label in mins:   # robust to other load on the machine
            fast = mins[label] / min(base.times)
            line += f" (fastest steps: {fast:.3f}x, {'met' if fast <= limit else 'missed'})"
        return line
    if cuda:
        lines += [verdict("FA (areas=1)", 1, 1.02), verdict("SAL partition K=16", 1, 0.06),
                  verdict("SAL replicate K=16", 1, 1.10)]
    else:
        lines += [verdict("FA (areas=1)", 1, 1.05), verdict("SAL partition K=16", 1, 0.025),
                  verdict("SAL replicate K=16", 1, 1.3),
                  verdict("SAL partition K=16", 2, 0.5, what="peak memory")]
    if "SAL partition K=16 compiled" in results:
        lines.append(verdict("SAL partition K=16 compiled", 1, 0.06 if cuda else 0.025)
                     + " (compiled, against the partition target)")
    print("\n".join(lines), flush=True)

    # ResNet-50-sized transform time (CPU graph capture; skipped past the budget).
    lines += ["", "## Transform time, ResNet-50-sized graph", ""]
    if budget_end and time.perf_counter() > budget_end:
        lines.append("skipped: --budget exhausted")
    else:
        try:
            transform_timing(lines)
        except Exception as exc:  # noqa: BLE001
            lines.append(f"failed: {_short(exc)}")

    # Where the time goes in the SAL partition step.
    part = next((r for r in runners if r.label == "SAL partition K=16" and not r.error), None)
    lines += ["", "## Where the time goes: SAL partition K=16 step (torch.profiler, 2 steps, top ops by self "
              + ("CUDA" if cuda else "CPU") + " time)", ""]
    if part is None:
        lines.append("no SAL partition variant ran")
    elif budget_end and time.perf_counter() > budget_end:
        lines.append("skipped: --budget exhausted")
    else:
        try:
            lines += ["```", profile_top(part, device).rstrip(), "```"]
        except Exception as exc:  # noqa: BLE001
            lines.append(f"profiler failed: {_short(exc)}")
    lines += ["", f"Total benchmark wall time: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"step_time_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text[text.index("## Transform time"):])
    print(f"wrote {out}")


# ---------------------------------------------------------------- --paper-scale
TARGETS_PAPER = {"FA eager": 1.2, "SAL-16 partition eager": 1.5, "SAL-16 partition compiled": 1.0}


class _FastPathOff:
    """Runs a variant with salcompile's eager fast path off (every op through the dispatcher)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        fast = _fast_module()
        fast.ENABLED = False
        try:
            return self.module(*args)
        finally:
            fast.ENABLED = True

    def parameters(self):
        return self.module.parameters()


def _compact_ops(module):
    """`module` with its eager forward rendered with the few-rows region path off
    (salcompile/ops/fast_region.py): every fused region runs its compact ops one by one, as
    before that path (the rendering is cached per module class, so this holds for its life)."""
    from salcompile.ops import fast, fast_region
    fast_region.ENABLED = False
    try:
        fast.eager_forward(module)
    finally:
        fast_region.ENABLED = True
    return module


class _FAPlusGate(torch.nn.Module):
    """The floor of a SAL step at this size: the FA model plus a region gate alone (its routing,
    count_routes, the local rule through its anchor, P in the optimizer) and no areas: what
    SAL-16 costs if sending rows to their areas were free. The gate's ops through the eager fast
    path, as SAL's own run; the `+ anchor` (a 0-dim zero that carries the local rule) costs one
    add and its backward more than SAL pays."""

    def __init__(self, fa, sal):
        super().__init__()
        from salcompile.ops import fast
        g = sal.sal_gates.gate_0
        self.fa = fa
        self.proj = torch.nn.Parameter(g.proj.detach().clone())
        self.register_buffer("prototypes", g.prototypes.detach().clone())
        self.register_buffer("counts", g.counts.detach().clone())
        self.rule = (sal.sal_config.temperature, sal.sal_config.balance_weight)
        self.gate = fast.op(torch.ops.salcompile.region_gate.default)
        self.count = fast.op(torch.ops.salcompile.count_routes.default)

    def forward(self, x):
        area, anchor = self.gate(x.flatten(1).detach(), self.proj, self.prototypes, *self.rule)
        self.count(area, self.counts)
        return self.fa(x) + anchor


def _fast_module():
    try:
        from salcompile.ops import fast
    except ImportError:   # a checkout from before the eager fast path (for before/after runs)
        return None
    return fast


def run_paper_scale(args):
    fast = _fast_module()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads if args.threads_given else 1)
    torch.manual_seed(0)
    rows = args.rows or 16
    rounds = args.rounds or (5 if args.quick else 15)
    steps = args.steps_per_round or (5 if args.quick else 50)
    start = time.perf_counter()
    budget_end = start + args.budget if args.budget else None
    base = MLP(64, 256, 10).to(device)
    x = torch.randn(rows, 64, device=device)
    y = torch.randint(0, 10, (rows,), device=device)

    def fresh():
        return copy.deepcopy(base)

    def sal(**kw):
        return salcompile.transform(fresh(), (x,), feedback="fa", **kw)

    specs = [
        ("dense BP eager", lambda: fresh()),
        ("dense BP compiled", lambda: torch.compile(fresh())),
        ("FA eager", lambda: sal(areas=1)),
        ("FA compiled", lambda: salcompile.compile(sal(areas=1))),
        ("SAL-16 partition eager", lambda: sal(areas=16)),
        ("SAL-16 partition compiled", lambda: salcompile.compile(sal(areas=16))),
        ("SAL-16 partition eager, compact ops (no few-rows region path)",
         lambda: _compact_ops(sal(areas=16))),
        ("SAL-16 partition eager, ops via dispatcher", lambda: _FastPathOff(sal(areas=16))),
        ("SAL-16 replicate eager", lambda: sal(areas=16, area_mode="replicate")),
        ("floor: FA eager + the region gate alone (no areas)",
         lambda: _FAPlusGate(sal(areas=1), sal(areas=16))),
    ]
    if fast is None:
        specs = [s for s in specs if "dispatcher" not in s[0] and "compact ops" not in s[0]
                 and "floor" not in s[0]]
    runners, failed = [], []
    for label, make in specs:
        if budget_end and time.perf_counter() > budget_end:
            failed.append((label, "skipped: --budget exhausted before it was built"))
            continue
        t0 = time.perf_counter()
        try:
            r = Runner(label, make(), x, y, optimizer=torch.optim.Adam)
            for _ in range(20):
                r.step()
            _sync(device)
            r.first_step_s = time.perf_counter() - t0
            runners.append(r)
            print(f"built {label} ({r.first_step_s:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            failed.append((label, _short(exc)))
    interleave(runners, rounds, budget_end, lambda r: r.time_round(device, steps))
    ok = [r for r in runners if r.times and not r.error]
    base_r = next((r for r in ok if r.label == "dense BP eager"), None)
    bmed = statistics.median(base_r.times) if base_r else None
    bmin = min(base_r.times) if base_r else None
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    cmd = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines = [f"# Training step time at the paper's scale ({args.device})", "",
             f"- command: `{cmd}`",
             f"- torch {torch.__version__}, Python {platform.python_version()}, device: {dev_name}, "
             f"threads: {torch.get_num_threads()}",
             f"- model: salcompile.models.MLP(64, 256, 10) (the zoo's `mlp`, 19,210 params), {rows} rows, "
             "float32, cross-entropy, Adam lr 1e-3; one step = zero_grad + forward + backward + step",
             f"- timing: 20 warm-up steps per variant, then {len(base_r.times) if base_r else 0} "
             f"interleaved rounds x {steps} steps; median (and fastest) of the per-round means",
             "", "| variant | median µs/step | vs dense BP eager | min µs/step | min vs dense min | "
                 "target | params |", "|---|---|---|---|---|---|---|"]
    results = {}
    for r in runners:
        if not r.times or r.error:
            lines.append(f"| {r.label} | failed | | | | {TARGETS_PAPER.get(r.label, '')} | {r.error} |")
            continue
        med, mn = statistics.median(r.times), min(r.times)
        results[r.label] = (med / bmed if bmed else float("nan"), mn / bmin if bmin else float("nan"))
        tgt = TARGETS_PAPER.get(r.label)
        lines.append(f"| {r.label} | {med * 1e6:.0f} | {results[r.label][0]:.2f} | {mn * 1e6:.0f} | "
                     f"{results[r.label][1]:.2f} | {f'<= {tgt}x' if tgt else ''} | "
                     f"{count_params(r.module):,} |")
    for label, err in failed:
        lines.append(f"| {label} | failed | | | | | {err} |")
    lines += ["", "## Against the issue's targets", ""]
    for label, limit in TARGETS_PAPER.items():
        if label not in results:
            lines.append(f"- {label}: no measurement")
            continue
        med, mn = results[label]
        lines.append(f"- {label}: {med:.2f}x dense BP eager, target <= {limit}x: "
                     f"{'met' if med <= limit else 'MISSED'} (fastest rounds: {mn:.2f}x, "
                     f"{'met' if mn <= limit else 'missed'})")
    phased = [r for r in ok if r.label in ("dense BP eager", "FA eager", "SAL-16 partition eager",
                                           "floor: FA eager + the region gate alone (no areas)")]
    if phased and not (budget_end and time.perf_counter() > budget_end):
        phases: dict = {}
        interleave(phased, max(3, rounds // 2), budget_end,
                   lambda r: phase_round(r, device, steps, phases))
        lines += ["", "## Per phase (µs/step; the same steps timed phase by phase, interleaved "
                  "rounds, medians; each phase sync'd, so the sum is a little above the step)", "",
                  "| variant | " + " | ".join(PHASES) + " | sum |",
                  "|---|" + "---|" * (len(PHASES) + 1)]
        for r in phased:
            meds = [statistics.median(phases[r.label][p]) * 1e6 for p in PHASES]
            lines.append(f"| {r.label} | " + " | ".join(f"{m:.0f}" for m in meds) +
                         f" | {sum(meds):.0f} |")
    part = next((r for r in ok if r.label == "SAL-16 partition eager"), None)
    if part is not None and not (budget_end and time.perf_counter() > budget_end):
        lines += ["", "## Where the time goes: SAL-16 partition eager step (torch.profiler, 2 steps, "
                  "top ops by self " + ("CUDA" if cuda else "CPU") + " time)", "",
                  "```", profile_top(part, device, rows=20).rstrip(), "```"]
    lines += ["", f"Total benchmark wall time: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    name = "step_time_paper_scale" + ("_cuda" if cuda else "") + ".md"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"wrote {out}")
    assert fast is None or fast.ENABLED


# ---------------------------------------------------------------- --fused-vs-unfused
def run_fused_vs_unfused(args):
    """Top-k routing and the shared dense path, fused (compact form, the default) beside
    fuse_regions=False (one area op per piece): SGD steps of a ReLU MLP, one thread, interleaved
    rounds, median of the per-round means. Two sizes: the paper's (64-256-10, batch 16, K=16)
    and a wider one (256 -> 3 x 512 -> 10, --rows rows, default 512, K=16)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads if args.threads_given else 1)
    rounds = args.rounds or (3 if args.quick else 9)
    steps = args.steps_per_round or (3 if args.quick else 20)
    cases = [("paper 64-256-10, 16 rows", MLP(64, 256, 10), 16, 64),
             (f"256-3x512-10, {args.rows or 512} rows", MLP(256, 512, 10, depth=4),
              args.rows or 512, 256)]
    forms = [("top-2 partition", dict(route_top_k=2)),
             ("top-2 replicate", dict(route_top_k=2, area_mode="replicate")),
             ("shared 0.5", dict(shared_fraction=0.5))]
    lines = ["| model | routing | fused µs/step | unfused µs/step | unfused / fused |",
             "|---|---|---|---|---|"]
    for case, base, rows, din in cases:
        torch.manual_seed(0)
        base = base.to(device)
        x = torch.randn(rows, din, device=device)
        y = torch.randint(0, 10, (rows,), device=device)
        for form, kw in forms:
            runners = [Runner(label, salcompile.transform(copy.deepcopy(base), (x,), areas=16,
                                                          fuse_regions=fuse, **kw), x, y)
                       for label, fuse in (("fused", True), ("unfused", False))]
            for r in runners:
                for _ in range(5):
                    r.step()
            for _ in range(rounds):
                for r in runners:
                    r.time_round(device, steps)
            f, u = (statistics.median(r.times) for r in runners)
            lines.append(f"| {case} | {form} | {f * 1e6:.0f} | {u * 1e6:.0f} | {u / f:.2f} |")
            print(lines[-1], flush=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    text = "\n".join([f"# Fused vs unfused step time ({args.device})", "", f"- command: `{cmd}`",
                      f"- torch {torch.__version__}, threads: {torch.get_num_threads()}, SGD, "
                      f"5 warm-up steps, {rounds} interleaved rounds x {steps} steps, medians",
                      ""] + lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}")


# ---------------------------------------------------------------- --billion
def run_billion(args):
    """--billion on CUDA in bf16; with --smoke, the same code on the CPU with the zoo entry's tiny
    version in float32 (a check of this script, not a result)."""
    from salcompile.models import REGISTRY, build
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("--billion needs CUDA (--smoke runs the tiny version on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    entry = REGISTRY["replicate-1b"]
    kwargs = entry.tiny if args.smoke else {}
    rows, steps = args.rows or (16384 if cuda else 64), args.steps
    din = kwargs.get("in_features", entry.input_shape[0])
    classes = kwargs.get("num_classes", 1024)
    x = torch.randn(rows, din, device=device, dtype=dtype)
    proj = torch.randn(din, classes, device=device, dtype=dtype)
    y = (x @ proj).argmax(1)  # a learnable synthetic task
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu (--smoke: tiny model)"
    lines = [f"# replicate-1b: SAL replicate K=16 (>= 1 B params) vs the same model with areas=1, {dtype} {device.type}", "",
             f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
             f"- torch {torch.__version__}, device {dev_name}, {rows} rows, "
             f"{steps} SGD steps (lr {args.lr}), labels = argmax(x @ fixed random {din}x{classes})",
             f"- REGISTRY['replicate-1b'].sal = {entry.sal}", "",
             "| variant | params | loss step 1 | loss last | median ms/step | peak GiB | transform s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for label, sal_kw in (("dense, FA, areas=1 (same active size)", dict(areas=1)),
                          ("SAL replicate K=16, FA", dict(entry.sal))):
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with torch.device(device):
                model = build("replicate-1b", **kwargs)
            model = model.to(dtype)
            t0 = time.perf_counter()
            sal = salcompile.transform(model, (x[:8],), **sal_kw)
            del model
            sal = sal.to(device)
            t_tr = time.perf_counter() - t0
            n = count_params(sal)
            opt = torch.optim.SGD(sal.parameters(), lr=args.lr)
            losses, times = [], []
            for i in range(steps):
                sync()
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(sal(x), y)
                loss.backward()
                opt.step()
                sync()
                times.append(time.perf_counter() - t1)
                losses.append(loss.item())
                if i % 10 == 0 or i == steps - 1:
                    print(f"{label} step {i + 1}: loss {losses[-1]:.4f} ({times[-1] * 1e3:.1f} ms)", flush=True)
            med = statistics.median(times[3:] if len(times) > 5 else times) * 1e3
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            lines.append(f"| {label} | {n:,} | {losses[0]:.4f} | {losses[-1]:.4f} | {med:.1f} | {peak:.1f} | "
                         f"{t_tr:.1f} | |")
            del sal, opt
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"| {label} | | | | failed | | | {_short(exc)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "step_time_billion.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer rows and rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    ap.add_argument("--per-round", type=int, default=None, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default 2 on the CPU, 8 with CUDA; --paper-scale: 1)")
    ap.add_argument("--paper-scale", action="store_true",
                    help="the paper's 64-256-10 MLP at batch 16 with Adam (per-op overhead)")
    ap.add_argument("--steps-per-round", type=int, default=None,
                    help="--paper-scale: steps per variant per interleaved round (default 50)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: variants/rounds/extras not started past this are reported as skipped")
    ap.add_argument("--out", default=None, help="results markdown path")
    ap.add_argument("--billion", action="store_true", help="the >= 1 B parameter replicate run (CUDA)")
    ap.add_argument("--smoke", action="store_true",
                    help="--billion's code on the CPU with the tiny model (checks the script)")
    ap.add_argument("--fused-vs-unfused", action="store_true",
                    help="top-k routing and the shared path, fused vs fuse_regions=False (1 thread)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    args.threads_given = args.threads is not None
    if args.threads is None:
        args.threads = 2 if not torch.cuda.is_available() else 8
    if args.fused_vs_unfused:
        run_fused_vs_unfused(args)
    elif args.paper_scale:
        run_paper_scale(args)
    elif args.billion:
        run_billion(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
