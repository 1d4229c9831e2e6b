"""The region gate: routing rule, its local learning rule, and that no network error reaches it."""
import torch
import torch.nn.functional as F

from salcompile.ops.gate import local_rule_grad, route

ops = torch.ops.salcompile
D = torch.float64


def _gate(t=12, f=6, r=5, k=4):
    feats = torch.randn(t, f, dtype=D)
    proj = torch.randn(r, f, dtype=D, requires_grad=True)
    protos = F.normalize(torch.randn(k, r, dtype=D), dim=1)
    return feats, proj, protos


def test_route_is_argmax_of_prototype_similarity():
    feats, proj, protos = _gate()
    area, anchor = ops.region_gate(feats, proj, protos, 0.1, 0.5)
    z = F.normalize(feats @ proj.detach().T, dim=1)
    assert torch.equal(area, (z @ protos.T).argmax(1))
    assert anchor.shape == () and anchor.item() == 0.0


def test_local_rule_gradient_equals_autograd_of_the_local_loss():
    feats, proj, protos = _gate()
    tau, alpha, k = 0.3, 0.7, protos.shape[0]
    area = route(feats, proj.detach(), protos)
    z = F.normalize(feats @ proj.T, dim=1)
    p = torch.softmax(z @ protos.T / tau, dim=1)
    frac = F.one_hot(area, k).to(D).mean(0)
    loss = F.nll_loss(p.log(), area) + alpha * k * (frac * p.mean(0)).sum()
    (expected,) = torch.autograd.grad(loss, proj)
    got = local_rule_grad(feats, proj.detach(), protos, area, tau, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gate_backward_ignores_the_network_error():
    feats, proj, protos = _gate()
    grads = []
    for scale in (1.0, -5.0, 100.0):
        area, anchor = ops.region_gate(feats, proj, protos, 0.1, 0.5)
        (anchor * scale).backward()
        grads.append(proj.grad.clone())
        proj.grad = None
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)


def test_gate_routes_each_token_of_sequence_features():
    feats, proj, protos = _gate(t=12)
    area, _ = ops.region_gate(feats.reshape(3, 4, 6), proj, protos, 0.1, 0.5)
    assert area.shape == (3, 4)
    assert torch.equal(area.reshape(-1), route(feats, proj.detach(), protos))


def test_counts_accumulate():
    counts = torch.zeros(4, dtype=D)
    ops.count_routes(torch.tensor([0, 3, 3, 1]), counts)
    ops.count_routes(torch.tensor([[3]]), counts)
    assert counts.tolist() == [1.0, 1.0, 0.0, 3.0]
