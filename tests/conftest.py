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


def pytest_configure(config):
    # `slow`: the tests that compile or export real models (tests/test_hf_models.py, d and e).
    # They run by default, CI included; `pytest -m "not slow"` leaves them out of a quick loop.
    config.addinivalue_line("markers", "slow: compiles or exports a model (deselect with "
                                       "-m 'not slow')")
