"""Small models covering every layer form the FA pass must reach, and gradient helpers."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", category=FutureWarning)
# A weight use the layer finder misses is a salcompile bug: in the tests the audit raises on it.
os.environ["SALCOMPILE_STRICT_AUDIT"] = "1"
D = torch.float64


class ResCNN(nn.Module):
    """ResNet-style block with batch norm, grouped, depthwise, transposed and 1-d convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.b2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.ct = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c1d = nn.Conv1d(4, 4, 3)
        self.c3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(4 + 2, 5)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = h + F.relu(self.b2(self.c2(h)))
        h = self.ct(self.dw(h))
        a = self.c1d(h.flatten(2)).mean(-1)
        b = self.c3d(x[:, :1].unsqueeze(1)).mean((2, 3, 4))
        return self.fc(torch.cat([a, b], 1))


class Functional(nn.Module):
    """Raw parameters used through F.linear, @ with a transposed weight, einsum and W @ x."""

    def __init__(self):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.b1 = nn.Parameter(torch.zeros(6))
        self.W2 = nn.Parameter(torch.randn(6, 6) * 0.4)
        self.W3 = nn.Parameter(torch.randn(4, 6, 3) * 0.4)
        self.W4 = nn.Parameter(torch.randn(2, 3) * 0.4)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.W1, self.b1))
        h = torch.tanh(h @ self.W2.T)
        h = torch.einsum("bi,kij->bj", h, self.W3)
        return torch.matmul(self.W4, h.unsqueeze(-1)).squeeze(-1)


class TiedLM(nn.Module):
    """Embedding and output head share one parameter."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, tokens):
        h = torch.relu(self.mix(self.emb(tokens)))
        return F.linear(h, self.emb.weight)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def mlp(d_in=8, hidden=16, d_out=3, depth=3):
    from salcompile.models import MLP
    return MLP(d_in, hidden, d_out, depth=depth)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def model_cases():
    """(name, model factory, input factory) in float64."""
    return [
        ("mlp", lambda: mlp().double(), lambda: torch.randn(5, 8, dtype=D)),
        ("rescnn", lambda: ResCNN().double(), lambda: torch.randn(3, 3, 6, 6, dtype=D)),
        ("functional", lambda: Functional().double(), lambda: torch.randn(4, 5, dtype=D)),
        ("tied_lm", lambda: TiedLM().double(), lambda: torch.randint(0, 11, (3, 7))),
        ("encoder", lambda: Encoder().double(), lambda: torch.randn(3, 5, 8, dtype=D)),
    ]


def loss_of(out):
    # A loss whose gradient differs per element, so wrong routing of gradients shows.
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (w * out).square().sum() if out.dtype.is_floating_point else out.sum()


def grads(module, *inputs):
    module.zero_grad(set_to_none=True)
    loss_of(module(*inputs)).backward()
    return {n.removeprefix("_orig_mod."): p.grad.detach().clone()
            for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_equal(a, b, rtol=1e-9, atol=1e-10):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def dense_transform(*args, **kwargs):
    """transform() without parameter areas (areas=1): the dense feedback-alignment model."""
    import salcompile
    kwargs.setdefault("areas", 1)
    return salcompile.transform(*args, **kwargs)


class BNCNN(nn.Module):
    """conv - batch norm - relu - conv - relu - linear, for 3x6x6 inputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(h)).flatten(1))


def assert_train_step_matches_sgd(sal, x, y, path, steps=3, lr=0.1):
    """export_train_step's graph run `steps` times by a TrainStepSession ends with the parameters
    torch.optim.SGD gives on a copy of `sal` (cross-entropy, the same batch every step)."""
    import copy
    import numpy as np
    import salcompile
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    salcompile.export_train_step(sal, (x,), path, optimizer="sgd", lr=lr)
    sess = salcompile.TrainStepSession(path, sal)
    ref = copy.deepcopy(sal)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        sess.step(x, y)
    trained = sess.state_dict()
    for n, p in ref.named_parameters():
        np.testing.assert_allclose(np.asarray(trained[n]), p.detach().numpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=n)


def grads_of(module, x, y):
    """(output, {parameter name: gradient}) of one cross-entropy backward of `module` on (x, y)."""
    module.zero_grad()
    out = module(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()
                          if p.grad is not None}


def assert_forms_agree(mods, opts, x, y, steps=3, reference="reference"):
    """Over `steps` optimizer steps, every module of `mods` ({name: module}) gives the outputs and
    every parameter gradient of mods[reference] (float64 tolerances)."""
    for step in range(steps):
        got = {n: grads_of(m, x, y) for n, m in mods.items()}
        out, want = got[reference]
        for name, (o, g) in got.items():
            torch.testing.assert_close(o, out, rtol=1e-9, atol=1e-11, msg=f"{name} {step}")
            assert g.keys() == want.keys()
            for n in want:
                torch.testing.assert_close(g[n], want[n], rtol=1e-9, atol=1e-11,
                                           msg=f"{name} step {step}: {n}")
        for o in opts.values():
            o.step()


def assert_compiled_grads(sal, x, y, want):
    """salcompile.compile of `sal` gives the gradients `want` ({name: gradient})."""
    import salcompile
    torch._dynamo.reset()
    compiled = salcompile.compile(sal)
    sal.zero_grad()
    F.cross_entropy(compiled(x), y).backward()
    for n, p in sal.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def assert_compiles_and_exports(sal, x, y, want, tmp_path):
    """salcompile.compile gives the gradients `want`; export_onnx runs in onnxruntime with the
    eval-mode outputs."""
    assert_compiled_grads(sal, x, y, want)
    assert_onnx_matches(sal, x, tmp_path)


def assert_onnx_matches(sal, x, tmp_path):
    """export_onnx of `sal` runs in onnxruntime with sal's eval-mode outputs (sal is left in eval
    mode)."""
    import numpy as np
    import salcompile
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    salcompile.export_onnx(sal, (x,), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    sal.eval()
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0],
                                   sal(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors, where a second thread only adds OpenMP
    barrier waits on a loaded machine. Use with pytestmark = pytest.mark.usefixtures(...)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group (torch.distributed initialised, world size 1)."""
    from datetime import timedelta
    import torch.distributed as dist
    import salcompile.distributed as sdist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        sdist.sync_gates()
        dist.barrier()
        dist.destroy_process_group()


def join_gloo(rank: int, store: str, out: str, world: int, timeout_s: float) -> None:
    """A spawned worker's start: its stderr (gloo's C++ messages, an abort at teardown included)
    to `out.rank<r>.log` for run_workers to show, one thread, the gloo group joined."""
    from datetime import timedelta
    import torch.distributed as dist
    log = os.open(f"{out}.rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def run_workers(worker, world: int, timeout_s: float, what: str):
    """Run worker(rank, store, out) in `world` spawned processes (each writes `out.rank<r>.done`
    when it finishes, rank 0 `out`), kill what is left after `timeout_s`, and return rank 0's
    torch.save'd results; a pytest failure with each rank's log when a rank did not finish."""
    import tempfile
    import time
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.pt")
        spawn = mp.get_context("spawn")
        procs = [spawn.Process(target=worker, args=(r, store, out)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.join(max(0.1, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        done = [os.path.exists(f"{out}.rank{r}.done") for r in range(world)]
        if not all(done) or not os.path.exists(out):
            logs = "\n".join(f"--- rank {r} (exit code {p.exitcode}):\n" +
                              open(f"{out}.rank{r}.log", errors="replace").read()[-3000:]
                              for r, p in enumerate(procs) if os.path.exists(f"{out}.rank{r}.log"))
            pytest.fail(f"{what} workers did not finish (done: {done}, timeout {timeout_s} s)"
                        f"\n{logs}")
        return torch.load(out, weights_only=False)


def pytest_configure(config):
    # `slow`: the tests that compile or export real models (tests/test_hf_models.py, d and e).
    # They run by default, CI included; `pytest -m "not slow"` leaves them out of a quick loop.
    config.addinivalue_line("markers", "slow: compiles or exports a model (deselect with "
                                       "-m 'not slow')")


@pytest.fixture
def compact_regions(monkeypatch):
    """Fused regions run as their compact ops one by one (salcompile/ops/fast_region.py's
    few-rows masked path off, read when a module first renders its eager forward): for tests
    that hold two forms equal bit for bit where only one of them could take that path (its own
    equality, to rounding, is tests/test_fast_region.py's)."""
    from salcompile.ops import fast_region
    monkeypatch.setattr(fast_region, "ENABLED", False)
