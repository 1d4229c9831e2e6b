"""The SAL path on every device and dtype this machine has: CPU always, CUDA when present
(benchmarks/gpu_check.sh runs this file on the GPU machine). fp32 and bf16: the fast path
(sorted compact rows; grouped matmuls where the device/dtype has them) equals the masked-dense
reference in outputs and gradients, and torch.compile keeps them."""
import pytest
import torch
import torch.nn.functional as F

import salcompile
from salcompile.models import DeepMLP

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _pair(device, dtype, mode, feedback="fa", rows=37, width=32, areas=4):
    torch.manual_seed(0)
    model = DeepMLP(16, width, 8, depth=4).to(device=device, dtype=dtype)
    x = torch.randn(rows, 16, device=device, dtype=dtype)
    cfg = dict(areas=areas, area_mode=mode, feedback=feedback)
    fast = salcompile.transform(model, (x,), area_impl="fast", **cfg)
    ref = salcompile.transform(model, (x,), area_impl="reference", **cfg)
    ref.load_state_dict(fast.state_dict())
    return fast, ref, x


def _step(module, x, sal=None):
    sal = sal or module
    out = module(x)
    y = torch.arange(x.shape[0], device=x.device) % out.shape[-1]
    loss = F.cross_entropy(out.float(), y)
    names = [n for n, p in sal.named_parameters()]
    grads = torch.autograd.grad(loss, list(sal.parameters()), allow_unused=True)
    return out.detach(), dict(zip(names, grads))


# (width, K): blocks of 8 features; blocks of 4 (bf16 groups 8 bytes apart: the per-area loop)
@pytest.mark.parametrize("width,areas", [(32, 4), (64, 16)], ids=["w32k4", "w64k16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["partition", "replicate"])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_equals_reference(device, dtype, mode, width, areas):
    fast, ref, x = _pair(device, dtype, mode, width=width, areas=areas)
    out_f, g_f = _step(fast, x)
    out_r, g_r = _step(ref, x)
    assert out_f.dtype == dtype and out_f.device.type == device
    torch.testing.assert_close(out_f, out_r, **TOL[dtype])
    assert g_f.keys() == g_r.keys()
    for n, g in g_r.items():
        if g is None:
            assert g_f[n] is None, n
        else:
            torch.testing.assert_close(g_f[n].float(), g.float(), **TOL[dtype], msg=n)
    assert sum(salcompile.routing_stats(fast)["gate_0"]["counts"]) == x.shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_partition_equals_eager(device):
    fast, _, x = _pair(device, torch.float32, "partition")
    out, eager = _step(fast, x)
    torch._dynamo.reset()
    compiled = salcompile.compile(fast, backend="aot_eager" if device == "cpu" else "inductor")
    got_out, got = _step(compiled, x, fast)
    torch.testing.assert_close(got_out, out, rtol=1e-4, atol=1e-5)
    for n, g in eager.items():
        if g is not None:
            torch.testing.assert_close(got[n], g, rtol=1e-3, atol=1e-5, msg=n)
