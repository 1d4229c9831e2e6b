"""SALConfig(check_finite=True): a NaN/inf in a layer output, a gradient or the input data raises a
SalcompileError naming where it appeared; healthy models train exactly as without the guards."""
import pytest
import torch
import torch.nn.functional as F

import salcompile
from conftest import ResCNN, TiedLM, mlp
from salcompile import SalcompileError

NAN, INF = float("nan"), float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _mlp_case(check=True, **kw):
    """A 3-layer MLP (layers.0, layers.1, head layers.2); areas=4 FA unless overridden."""
    kw.setdefault("areas", 4)
    x = torch.randn(16, 8)
    return salcompile.transform(mlp(8, 16, 3, depth=3), (x,), check_finite=check, **kw), x


def _set(sal, name, fill, index=None):
    with torch.no_grad():
        params = dict(sal.named_parameters())
        t = params[name] if name in params else sal.get_buffer(name)
        if index is None:
            t.fill_(fill)
        else:
            t[index] = fill


def _finite(t):
    return bool(torch.isfinite(t).all())


# --------------------------------------------------------------------------- forward: input, layer

@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_nan_in_the_input_is_reported_as_bad_input(capture):
    if capture == "export":
        sal, x = _mlp_case()
    else:  # no shapes recorded: the input guard checks the type at run time
        sal, x = salcompile.transform(mlp(8, 16, 3, depth=3), areas=1, check_finite=True), \
            torch.randn(4, 8)
    x[1, 2] = NAN
    with pytest.raises(SalcompileError, match=r"model input x \(forward\): 1 NaN, 0 inf of "
                                              rf"{x.numel()} values; clean the input data"):
        sal(x)


@pytest.mark.parametrize("areas", [1, 4])
def test_inf_weight_in_a_middle_layer_is_named_in_the_forward(areas):
    sal, x = _mlp_case(areas=areas)
    # dense: one weight; areas: a sample computes only its area's block, so poison every block
    _set(sal, "layers.1.weight", INF, (0, 0) if areas == 1 else None)
    message = r"in the output of layer layers\.1 \(forward\): \d+ NaN, \d+ inf of \d+ values; lower"
    with pytest.raises(SalcompileError, match=message):
        sal(x)


# --------------------------------------------------------------------------- backward

def test_inf_gradient_from_a_finite_loss_names_the_head_in_the_backward():
    sal, x = _mlp_case()
    out = sal(x)
    loss = torch.sqrt(out - out.detach()).sum()  # 0 in the forward, d/dout = 1/(2·sqrt(0)) = inf
    assert _finite(loss)
    with pytest.raises(SalcompileError, match=r"gradient reaching layer layers\.2 \(backward\): "
                                              r"0 NaN, 48 inf of 48 values"):
        loss.backward()


@pytest.mark.parametrize("feedback,buffer,layer", [
    ("fa", "layers.2.weight_feedback", "layers.1"),  # B of the head carries the error to layers.1
    ("dfa", "layers.1.weight_dfa", "layers.0"),  # e·D reaches layers.1's input = relu(layers.0)
])
def test_non_finite_feedback_is_caught_at_the_layer_it_reaches(feedback, buffer, layer):
    sal, x = _mlp_case(feedback=feedback, areas=4 if feedback == "fa" else 1)
    _set(sal, buffer, INF)
    loss = F.cross_entropy(sal(x), torch.randint(0, 3, (16,)))
    assert _finite(loss)  # the forward never reads the feedback
    with pytest.raises(SalcompileError, match=rf"gradient reaching layer {layer} \(backward\)"):
        loss.backward()


# --------------------------------------------------------------------------- off: silent NaN

def test_without_check_finite_the_same_faults_pass_silently():
    sal, x = _mlp_case(check=False)
    bad = x.clone()
    bad[1, 2] = NAN
    assert not _finite(sal(bad))
    out = sal(x)
    torch.sqrt(out - out.detach()).sum().backward()
    assert not all(_finite(p.grad) for p in sal.parameters() if p.grad is not None)
    _set(sal, "layers.1.weight", INF)
    assert not _finite(sal(x))
    assert "check_finite" not in sal.code


# --------------------------------------------------------------------------- healthy: no change

def _cases():
    return [
        ("mlp-areas4-fa", lambda: mlp(8, 16, 3, depth=3), lambda: torch.randn(16, 8),
         dict(areas=4)),
        ("mlp-dfa", lambda: mlp(8, 16, 3, depth=3), lambda: torch.randn(16, 8),
         dict(areas=1, feedback="dfa")),
        ("cnn-fa", ResCNN, lambda: torch.randn(3, 3, 6, 6), dict(areas=1)),
        ("tied-lm-fa", TiedLM, lambda: torch.randint(0, 11, (3, 7)), dict(areas=1)),  # int input
    ]


@pytest.mark.parametrize("name,model,inp,kw", _cases(), ids=[c[0] for c in _cases()])
def test_guards_change_no_output_and_no_gradient(name, model, inp, kw, compact_regions):
    model, x = model(), inp()
    runs = {}
    for check in (False, True):
        sal = salcompile.transform(model, (x,), check_finite=check, **kw)
        sal.zero_grad(set_to_none=True)
        out = sal(x)
        (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).square().sum().backward()
        runs[check] = out.detach(), {n: p.grad for n, p in sal.named_parameters()
                                     if p.grad is not None}
        guards = sal.code.count("check_finite.default")
        layers, float_inputs = len(sal.sal_plan.layers), int(x.is_floating_point())
        assert guards == (layers + float_inputs if check else 0), (name, guards)
    (out0, g0), (out1, g1) = runs[False], runs[True]
    assert torch.equal(out0, out1)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


# --------------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_with_guards():
    """Zero graph breaks; same outputs and gradients as eager; both guards fire at run time.

    A forward guard's SalcompileError is raised, but torch (2.13) masks any exception raised inside
    a fullgraph-compiled fx.GraphModule: FX's error handler (_WrappedCall.__call__) calls
    traceback.walk_tb, a generator dynamo refuses under fullgraph, so the caller gets
    torch._dynamo.exc.Unsupported with the SalcompileError as its __context__. The backward runs
    outside dynamo and raises the SalcompileError itself."""
    sal, x = _mlp_case()
    torch._dynamo.reset()
    compiled = salcompile.compile(sal, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sal(x))
    out = compiled(x)
    loss = torch.sqrt(out - out.detach()).sum()
    with pytest.raises(SalcompileError, match=r"layers\.2 \(backward\)"):
        loss.backward()
    bad = x.clone()
    bad[0, 0] = NAN
    with pytest.raises(Exception) as info:
        compiled(bad)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, SalcompileError) and "model input x (forward)" in str(e)
               for e in chain), chain
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bf16, 128 layers

def test_bf16_128_layer_sal_trains_without_nan():
    """The issue's deep bf16 run: 128 linear layers, K=16 areas, every output and gradient guarded.

    deep-mlp-res: the plain deep-mlp's output underflows to exactly 0 at depth 128 under K=16
    (documented in models/mlp.py), which would make 'no NaN' vacuous."""
    from salcompile.models import build
    model = build("deep-mlp-res", in_features=16, width=32, num_classes=4, depth=128)
    model = model.to(torch.bfloat16)
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    y = torch.randint(0, 4, (32,))
    sal = salcompile.transform(model, (x,), areas=16, check_finite=True)
    assert len(sal.sal_plan.layers) == 128
    for opt in (torch.optim.SGD(sal.parameters(), lr=0.05),
                torch.optim.Adam(sal.parameters(), lr=1e-3)):
        for _ in range(3):
            opt.zero_grad()
            out = sal(x)
            assert out.dtype == torch.bfloat16 and out.float().std() > 0.1  # not collapsed to 0
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            opt.step()
            assert _finite(loss)
    assert all(_finite(p) and p.dtype == torch.bfloat16 for p in sal.parameters())
    assert all(p.grad is not None and _finite(p.grad) for n, p in sal.named_parameters()
               if n.startswith("layers."))
