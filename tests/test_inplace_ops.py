"""In-place ops (nn.ReLU(inplace=True), `out += identity`, `x.add_()`) after FA and area ops.

Each model comes in two forms with the same parameters: in-place ops, and the same computation
out of place. The transformed in-place model must give the out-of-place model's outputs and
gradients under every feedback rule and area setting, and with feedback='bp' or FA with B = W,
plain autograd's gradients of the untransformed model (float64).
"""
import warnings

import pytest
import torch
from torch import nn

import salcompile
from conftest import assert_grads_equal, loss_of

D = torch.float64
s = torch.ops.salcompile


# ---------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: `out += identity; out = self.relu(out)`, ReLU(inplace=True)."""
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _skip_relu(self, out, x)


def _skip_relu(block, out, x):
    """torchvision's block ending: `out += identity; out = self.relu(out)` (or out of place)."""
    identity = x if block.downsample is None else block.downsample(x)
    if block.inplace:
        out += identity
    else:
        out = out + identity
    return block.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (1x1, 3x3, 1x1, expansion 4)."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=inplace)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return _skip_relu(self, out, x)


class ResNet(nn.Module):
    """torchvision-style ResNet, tiny: stem conv-BN-ReLU(inplace)-maxpool, 2 stages (the second
    strided, with a conv+BN downsample), global average pool, linear head."""

    def __init__(self, block=BasicBlock, widths=(8, 16), blocks=1, num_classes=4, inplace=True):
        super().__init__()
        self.inplanes, self.inplace = widths[0], inplace
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=inplace)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, widths[0], blocks, 1)
        self.layer2 = self._stage(block, widths[1], blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1] * block.expansion, num_classes)

    def _stage(self, block, planes, n, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                                           bias=False), nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down, self.inplace)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, inplace=self.inplace) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """VGG-style: conv-ReLU(inplace)-maxpool, conv-BN-ReLU(inplace)-maxpool, classifier
    Linear-ReLU(inplace)-Dropout twice, Linear."""

    def __init__(self, num_classes=4, inplace=True):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4, 32), nn.ReLU(inplace=inplace), nn.Dropout(0.0),
            nn.Linear(32, 16), nn.ReLU(inplace=inplace), nn.Dropout(0.0),
            nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Unbound(nn.Module):
    """In-place ops whose result is not rebound: `fc(h)` after `h.add_()` reads the mutated h
    (symbolic_trace records it as a read of h before the mutation)."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        if self.inplace:
            h.add_(1.0).mul_(0.5).relu_()
        else:
            h = torch.relu((h + 1.0) * 0.5)
        g = self.b(h)
        if self.inplace:
            g += h
            torch.tanh_(g)
        else:
            g = torch.tanh(g + h)
        return self.c(g)


class Tokens(nn.Module):
    """[B, T, F] rows: a 3-D linear's output (a view inside F.linear) and an einsum's (a permuted
    view) modified in place."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.a, self.c = nn.Linear(8, 16), nn.Linear(16, 4)
        self.W = nn.Parameter(torch.randn(16, 16) * 0.3)

    def forward(self, x):
        h = self.a(x)
        h = h.relu_() if self.inplace else h.relu()
        g = torch.einsum("bti,io->bto", h, self.W)
        if self.inplace:
            g.add_(h)
        else:
            g = g + h
        return self.c(g)


class Unbatched(nn.Module):
    """An unbatched [C, H, W] convolution (its output is a squeezed view) then relu_."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = self.c1(x)
        return self.c2(h.relu_() if self.inplace else h.relu())


MODELS = {
    "resnet_basic": (lambda ip: ResNet(BasicBlock, inplace=ip), (3, 8, 8)),
    "resnet_bottleneck": (lambda ip: ResNet(Bottleneck, widths=(4, 8), inplace=ip), (3, 8, 8)),
    "vgg": (lambda ip: VGG(inplace=ip), (3, 8, 8)),
    "unbound": (lambda ip: Unbound(ip), (8,)),
    "tokens": (lambda ip: Tokens(ip), (5, 8)),
}


def make(name, inplace):
    torch.manual_seed(0)
    return MODELS[name][0](inplace).to(D)


def batch(name, n=4):
    torch.manual_seed(1)
    return torch.randn(n, *MODELS[name][1], dtype=D)


def out_and_grads(module, x):
    module.zero_grad(set_to_none=True)
    out = module(x)
    loss_of(out).backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                          for n, p in module.named_parameters() if p.grad is not None}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-9, atol=1e-10)
    assert_grads_equal(a[1], b[1])


def transform(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salcompile.transform(model, x if x is None else (x,), **kw)


FA_IS_BP = dict(feedback="fa", feedback_init="weights", feedback_scale="none")


# ---------------------------------------------------------------------------------- ops
def _fa_outputs():
    w, b = torch.randn(4, 5, dtype=D, requires_grad=True), torch.randn(4, dtype=D)
    wc = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    wm = torch.randn(5, 4, dtype=D, requires_grad=True)
    x = lambda *shape: torch.randn(*shape, dtype=D, requires_grad=True)  # noqa: E731
    conv = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1, False)
    return {
        "linear 1-d": lambda: s.fa_linear(x(5), w, b, w.detach(), False),
        "linear 3-d": lambda: s.fa_linear(x(2, 3, 5), w, b, w.detach(), False),
        "conv unbatched": lambda: s.fa_conv(x(3, 6, 6), wc, None, wc.detach(), *conv),
        "matmul 1-d": lambda: s.fa_matmul(x(5), wm, wm.detach(), False, False),
        "einsum": lambda: s.fa_einsum("bti,io->bto", x(2, 3, 5), wm, wm.detach(), False, False),
        "einsum transposed": lambda: s.fa_einsum("io,bti->obt", x(2, 3, 5), wm, wm.detach(),
                                                 True, False),
    }


@pytest.mark.parametrize("case", list(_fa_outputs()))
def test_fa_op_output_is_not_a_view_and_takes_an_inplace_op(case):
    y = _fa_outputs()[case]()
    assert not y._is_view()
    y.relu_()   # was: "Output 0 of GeneratedBackwardFor_salcompile_fa_..._default is a view"
    y.sum().backward()


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
@pytest.mark.parametrize("feedback", ["bp", "fa=bp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_inplace_model_gives_plain_autograd_gradients(name, feedback, capture):
    x = batch(name)
    kw = dict(feedback="bp") if feedback == "bp" else FA_IS_BP
    sal = transform(make(name, True), x if capture == "export" else None, areas=1, **kw)
    assert sal.sal_plan.capture == capture
    assert_same(out_and_grads(sal, x), out_and_grads(make(name, False), x))


@pytest.mark.parametrize("feedback", ["bp", "fa=bp"])
def test_unbatched_conv_then_relu_(feedback):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, dtype=D)
    kw = dict(feedback="bp") if feedback == "bp" else FA_IS_BP
    mk = lambda ip: (torch.manual_seed(0), Unbatched(ip).to(D))[1]  # noqa: E731
    sal = transform(mk(True), x, areas=1, **kw)
    assert_same(out_and_grads(sal, x), out_and_grads(mk(False), x))


def test_batch_of_one_resnet():
    x = batch("resnet_basic", 1)
    sal = transform(make("resnet_basic", True), x, areas=1, **FA_IS_BP)
    assert_same(out_and_grads(sal, x), out_and_grads(make("resnet_basic", False), x))


CONFIGS = {
    "fa": dict(feedback="fa", areas=1),
    "dfa": dict(feedback="dfa", areas=1),
    "fa-sal4-fused": dict(feedback="fa", areas=4),
    "fa-sal4-unfused-finite": dict(feedback="fa", areas=4, fuse_regions=False,
                                   check_finite=True),
    "bp-sal4-reference": dict(feedback="bp", areas=4, area_impl="reference"),
    "dfa-sal4-finite": dict(feedback="dfa", areas=4, check_finite=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "vgg", "unbound", "tokens"])
def test_inplace_model_equals_its_out_of_place_twin(name, config):
    x = batch(name)
    ip = transform(make(name, True), x, **CONFIGS[config])
    oop = transform(make(name, False), x, **CONFIGS[config])
    assert_same(out_and_grads(ip, x), out_and_grads(oop, x))


@pytest.mark.parametrize("config", ["fa-sal4-fused", "bp-sal4-reference"])
@pytest.mark.parametrize("name", ["vgg", "unbound"])
def test_symbolic_trace_inplace_model_equals_its_out_of_place_twin(name, config):
    """Before: symbolic_trace's `fc(h)` after `h.add_()` read h unmutated, so the areas read a
    block of a value no longer area-sparse and the in-place ops were dropped (silently wrong)."""
    x = batch(name)
    cfg = CONFIGS[config]
    if name == "vgg":   # a gate before a conv needs export's shapes: gate the classifier
        cfg = {**cfg, "gate_layers": ["classifier.0", "classifier.3"]}
    ip = transform(make(name, True), None, **cfg)
    oop = transform(make(name, False), None, **cfg)
    assert ip.sal_plan.capture == "symbolic_trace"
    assert str(ip.sal_plan) == str(oop.sal_plan)
    assert_same(out_and_grads(ip, x), out_and_grads(oop, x))


def test_compiled_and_reloaded_inplace_resnet_give_the_eager_gradients(tmp_path):
    x = batch("resnet_basic")
    sal = transform(make("resnet_basic", True), x, areas=4)
    eager = out_and_grads(sal, x)
    assert_same(eager, out_and_grads(transform(make("resnet_basic", False), x, areas=4), x))
    torch._dynamo.reset()
    compiled = salcompile.compile(sal, backend="aot_eager")
    assert_same(out_and_grads(compiled, x), eager)
    path = tmp_path / "m.pt2"
    salcompile.save(sal, (x,), path)
    assert_same(out_and_grads(salcompile.load(path), x), eager)


def test_compiled_inplace_tokens_model():
    x = batch("tokens")
    sal = transform(make("tokens", True), x, areas=1)
    eager = out_and_grads(sal, x)
    torch._dynamo.reset()
    assert_same(out_and_grads(salcompile.compile(sal, backend="aot_eager"), x), eager)


# ---------------------------------------------------------------------------------- the pass
def _targets(gm):
    return [(n.target, n.args) for n in gm.graph.nodes if n.op == "call_function"]


def test_pass_makes_private_inplace_ops_out_of_place_and_keeps_the_rest():
    x = batch("resnet_basic")
    sal = transform(make("resnet_basic", True), x, feedback="bp", areas=1)
    aten = torch.ops.aten
    targets = _targets(sal)
    assert not any(t is aten.relu_.default for t, _ in targets)
    assert sum(t is aten.relu.default for t, _ in targets) == 5
    # batch norm's step counters (buffers) are still incremented in place
    counters = [a for t, a in targets if t is aten.add_.Tensor]
    assert len(counters) == 6 and all(a[0].op == "get_attr" for a in counters)
    sal.train()
    sal(x)
    assert int(sal.get_buffer("bn1.num_batches_tracked")) == 1


class MutatesInputAndView(nn.Module):
    """Mutations the pass must leave in place: the model's input, and a view of a value that is
    read afterwards."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        x.mul_(2.0)                 # the caller's tensor
        h = self.a(x)
        h[:, :3].add_(1.0)          # through a view: h itself changes
        return self.b(h)


def test_pass_leaves_input_and_view_mutations_in_place():
    torch.manual_seed(0)
    model = MutatesInputAndView().to(D)
    x = torch.randn(4, 6, dtype=D)
    sal = transform(model, x.clone(), **FA_IS_BP, areas=1)
    mine, theirs = x.clone(), x.clone()
    assert_same(out_and_grads(sal, mine), out_and_grads(model, theirs))
    torch.testing.assert_close(mine, 2 * x)   # the input is mutated, as by the original model
    aten = torch.ops.aten
    assert any(t is aten.add_.Tensor for t, _ in _targets(sal))


def test_pass_alone_changes_no_value():
    from salcompile.capture import capture
    from salcompile.passes import functionalize_inplace
    for name in MODELS:
        x = batch(name)
        for ex in ((x,), None):
            model = make(name, True)
            gm, _ = capture(model, ex)
            ref = out_and_grads(gm, x)
            gm = functionalize_inplace(gm)
            assert_same(out_and_grads(gm, x), ref)
            assert_same(ref, out_and_grads(make(name, False), x))
