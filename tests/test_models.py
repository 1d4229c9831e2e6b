"""The model zoo: every entry transforms under its recommended SAL config and trains."""
import warnings

import pytest
import torch

import salcompile
from salcompile import SalcompileError
from salcompile.models import REGISTRY, DeepMLP, LeNet5, MLP, build, example_input

torch.set_num_threads(1)
TRAINABLE = [n for n in REGISTRY if n != "replicate-1b"]


def _output_shape(name, batch):
    return (batch, 64, 65) if name == "gpt" else (batch, 10)


@pytest.mark.parametrize("name", TRAINABLE)
def test_entry_transforms_and_trains(name):
    entry = REGISTRY[name]
    model, x = build(name), example_input(name, batch=4)
    assert x.dtype == entry.input_dtype and tuple(x.shape) == (4, *entry.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer silently left on backprop
        sal = salcompile.transform(model, (x,), **entry.sal)
    assert len(sal.sal_plan.regions) >= 1, "SAL areas not applied"
    out = sal(x)
    assert tuple(out.shape) == _output_shape(name, 4)
    out.float().square().mean().backward()
    for n, p in sal.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {n}"
    assert any(p.grad.abs().sum() > 0 for n, p in sal.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("name", TRAINABLE)
def test_dense_fa_equals_plain_forward(name):
    model, x = build(name), example_input(name, batch=4)
    sal = salcompile.transform(model, (x,), areas=1)
    assert not sal.sal_plan.regions
    model.eval(), sal.eval()
    with torch.no_grad():
        torch.testing.assert_close(sal(x), model(x))


@pytest.mark.parametrize("name,kwargs,in_shape,out_shape", [
    ("mlp", dict(in_features=784, num_classes=3), (784,), (3,)),
    ("mlp-mnist", dict(in_features=64, num_classes=26), (64,), (26,)),
    ("lenet5", dict(in_channels=3, num_classes=5), (3, 28, 28), (5,)),
    ("deep-mlp", dict(in_features=32, num_classes=4, width=32, depth=5), (32,), (4,)),
    ("deep-mlp-res", dict(in_features=12, num_classes=2), (12,), (2,)),
    ("resnet20", dict(in_channels=1, num_classes=100), (1, 32, 32), (100,)),
    ("vit", dict(in_channels=1, num_classes=7, image_size=16), (1, 16, 16), (7,)),
    ("gpt", dict(vocab_size=30, seq_len=16), (16,), (16, 30)),
    ("gpt", dict(num_classes=27, seq_len=8), (8,), (8, 27)),
])
def test_build_kwargs_fit_the_data(name, kwargs, in_shape, out_shape):
    model, x = build(name, **kwargs), example_input(name, batch=3, **kwargs)
    assert tuple(x.shape) == (3, *in_shape)
    if name == "gpt":
        assert int(x.max()) < out_shape[-1]
    with torch.no_grad():
        assert tuple(model(x).shape) == (3, *out_shape)


@pytest.mark.parametrize("residual", [False, True])
def test_deep_mlp_depth_128_is_finite(residual):
    torch.manual_seed(0)
    model, x = DeepMLP(64, 64, 10, depth=128, residual=residual), torch.randn(8, 64)
    assert len(model.layers) == 128
    with torch.no_grad():
        bp = model(x)
    assert torch.isfinite(bp).all() and 1e-3 < bp.std() < 1e2, bp.std()
    sal = salcompile.transform(model, (x,), areas=16)
    assert len(sal.sal_plan.regions[0]["layers"]) == 127
    out = sal(x)
    assert torch.isfinite(out).all() and out.abs().max() < 1e2
    if residual:  # without skips, every partitioned layer reading its area block scales by ~1/√K
        assert out.std() > 1e-2, out.std()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in sal.parameters())


def test_replicate_1b_on_meta():
    entry = REGISTRY["replicate-1b"]
    assert entry.sal["area_mode"] == "replicate" and entry.sal["areas"] == 16
    with torch.device("meta"):
        model, x = build("replicate-1b"), example_input("replicate-1b", batch=2)
    assert x.is_meta and all(p.is_meta for p in model.parameters())
    dense = sum(p.numel() for p in model.parameters())
    sal = salcompile.transform(model, (x,), **entry.sal)
    total = sum(p.numel() for p in sal.parameters())
    assert all(t.is_meta for t in [*sal.parameters(), *sal.buffers()])
    head = sum(p.numel() for p in model.layers[-1].parameters())
    gate = sum(p.numel() for n, p in sal.named_parameters() if n.startswith("sal_gates"))
    assert total == 16 * (dense - head) + head + gate >= 1e9
    assert tuple(sal(x).shape) == (2, 1024)


def test_registry_api():
    assert isinstance(build("mlp"), MLP) and isinstance(build("lenet5"), LeNet5)
    assert {"mlp", "mlp-mnist", "lenet5", "deep-mlp", "deep-mlp-res", "resnet20", "vit", "gpt",
            "replicate-1b"} <= set(REGISTRY)
    assert REGISTRY["gpt"].input_dtype == torch.long and example_input("gpt").dtype == torch.long
    assert build("deep-mlp-res").residual and not build("deep-mlp").residual
    assert len(build("deep-mlp", depth=128, width=16).layers) == 128


def test_unknown_model_and_keyword():
    with pytest.raises(SalcompileError, match="unknown model 'nope'.*mlp"):
        build("nope")
    with pytest.raises(SalcompileError, match="unknown model"):
        example_input("nope")
    for call in (build, example_input):
        with pytest.raises(TypeError, match="widht"):  # a SalcompileError that is a TypeError
            call("deep-mlp", widht=3)
        with pytest.raises(SalcompileError, match="keywords are: in_features, num_classes"):
            call("mlp", in_channels=3)
    with pytest.raises(SalcompileError, match="must equal vocab_size"):
        build("gpt", vocab_size=65, num_classes=10)
