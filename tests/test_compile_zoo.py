"""Every zoo model in every mode compiles with fullgraph=True, zero graph breaks, and the compiled
module's loss gradients equal the eager transformed module's.

The suite compiles with the aot_eager backend: it runs dynamo, fake tensors, functionalization and
AOT autograd over the forward and the (feedback) backward, which is where graph breaks and
custom-op mistakes show up, without inductor's C++ build per case (minutes on 2 cores).
`benchmarks/compile_zoo.py` runs the same matrix through inductor."""
import pytest
import torch
import torch.nn.functional as F

import salcompile
from salcompile import models


def loss_grads(module, sal, x):
    out = module(x)
    target = torch.zeros(out.shape[:-1], dtype=torch.long)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    params = [p for p in sal.parameters() if p.requires_grad]
    return out.detach(), dict(zip([n for n, p in sal.named_parameters() if p.requires_grad],
                                  torch.autograd.grad(loss, params, allow_unused=True)))


@pytest.mark.parametrize("mode", list(models.MODES))
@pytest.mark.parametrize("name", list(models.REGISTRY))
def test_zoo_compiles_fullgraph_with_the_eager_gradients(name, mode):
    sal, x = models.smoke_case(name, mode)
    out, eager = loss_grads(sal, sal, x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(sal)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = salcompile.compile(sal, backend="aot_eager")
    got_out, got = loss_grads(compiled, sal, x)
    torch.testing.assert_close(got_out, out, rtol=1e-5, atol=1e-6)
    assert got.keys() == eager.keys()
    for n, g in eager.items():
        if g is None:
            assert got[n] is None, n
        else:
            torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert any(g is not None and g.abs().sum() > 0 for g in got.values())
