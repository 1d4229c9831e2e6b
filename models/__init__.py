"""The model zoo (salcompile.models): a registry the CLI reads with `--model NAME`.

    model = build("resnet20", num_classes=100)
    x = example_input("resnet20", batch=8)
    sal = salcompile.transform(model, (x,), **REGISTRY["resnet20"].sal)

Every factory takes `num_classes` and its input-size keyword (`in_features` for MLPs,
`in_channels` for convolutional models and the ViT, `vocab_size` and `seq_len` for the GPT), so a
model can be fitted to a dataset; `example_input` takes the same keywords. Each entry's `sal`
holds the SALConfig overrides under which `salcompile.transform` succeeds with its areas (default
K=16: every gated layer's width divisible by 16).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from salcompile.errors import SalcompileError
from salcompile.validate import Int, check, check_memory, flag

from .cnn import BasicBlock, LeNet5, ResNet20
from .mlp import MLP, DeepMLP
from .transformer import GPT, Block, ViT

__all__ = ["ModelEntry", "REGISTRY", "MODES", "build", "example_input", "smoke_case",
           "ModelArgumentError",
           "MLP", "DeepMLP", "LeNet5", "ResNet20", "BasicBlock", "ViT", "GPT", "Block"]


class ModelArgumentError(SalcompileError, TypeError):
    """A keyword a zoo factory does not take (catchable as SalcompileError or TypeError)."""


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]   # accepts the keyword args documented per entry
    input_shape: Tuple[int, ...]        # default example input shape without batch
    description: str
    sal: Dict[str, Any] = field(default_factory=dict)   # SALConfig overrides recommended for this model
    input_dtype: torch.dtype = torch.float32            # torch.long for token models
    tiny: Dict[str, Any] = field(default_factory=dict)  # keywords of a small version (smoke tests)


def _mlp(*, in_features: int = 64, num_classes: int = 10, hidden: int = 256, depth: int = 2):
    return MLP(in_features, hidden, num_classes, depth)


def _mlp_mnist(*, in_features: int = 784, num_classes: int = 10, hidden: int = 256, depth: int = 2):
    return MLP(in_features, hidden, num_classes, depth)


def _lenet5(*, in_channels: int = 1, num_classes: int = 10):
    return LeNet5(in_channels, num_classes)


def _deep_mlp(*, in_features: int = 64, num_classes: int = 10, width: int = 256, depth: int = 8,
              residual: bool = False):
    return DeepMLP(in_features, width, num_classes, depth, residual)


def _deep_mlp_res(*, in_features: int = 64, num_classes: int = 10, width: int = 256, depth: int = 8,
                  residual: bool = True):
    return DeepMLP(in_features, width, num_classes, depth, residual)


def _resnet20(*, in_channels: int = 3, num_classes: int = 10):
    return ResNet20(in_channels, num_classes)


def _vit(*, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, patch: int = 4,
         dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128):
    return ViT(in_channels, num_classes, image_size, patch, dim, depth, heads, mlp_dim)


def _gpt(*, vocab_size: Optional[int] = None, seq_len: int = 64,
         num_classes: Optional[int] = None, dim: int = 64, depth: int = 2, heads: int = 4,
         mlp_dim: int = 256):
    return GPT(_vocab(vocab_size, num_classes), seq_len, dim, depth, heads, mlp_dim)


def _vocab(vocab_size: Optional[int], num_classes: Optional[int]) -> int:
    """An LM's classes are its vocabulary: either keyword sets it (default 65, tiny Shakespeare)."""
    if vocab_size is not None and num_classes is not None and vocab_size != num_classes:
        raise SalcompileError(f"gpt: num_classes={num_classes} must equal vocab_size={vocab_size} "
                              "(the model predicts the next token).")
    return vocab_size or num_classes or 65


def _replicate_1b(*, in_features: int = 1024, num_classes: int = 1024, width: int = 4096,
                  depth: int = 8):
    return DeepMLP(in_features, width, num_classes, depth)


REGISTRY: Dict[str, ModelEntry] = {
    "mlp": ModelEntry(_mlp, (64,), "the paper's MLP 64-256-10 (scikit-learn digits), 19,210 params",
                      tiny=dict(hidden=32)),
    "mlp-mnist": ModelEntry(_mlp_mnist, (784,), "MLP 784-256-10 (MNIST), 203,530 params",
                            tiny=dict(in_features=16, hidden=32)),
    "lenet5": ModelEntry(
        _lenet5, (1, 28, 28),
        "classic LeNet-5 on 28x28 (61,706 params); its 6/120/84 widths do not divide by 16, so SAL "
        "gates conv2 (16 channels) only, the other layers train dense with FA",
        sal=dict(gate_layers=["conv2"])),
    "deep-mlp": ModelEntry(_deep_mlp, (64,),
                           "DeepMLP 64-(256 x 7)-10, 8 linear layers, ReLU (depth up to 128), "
                           "413,962 params; under SAL partition each layer reading its area block "
                           "scales activations by ~1/sqrt(K) at init (see deep-mlp-res)",
                           tiny=dict(width=16, depth=4)),
    "deep-mlp-res": ModelEntry(_deep_mlp_res, (64,),
                               "residual DeepMLP 64-(256 x 7)-10, pre-activation skips scaled "
                               "1/sqrt(depth-2), 413,962 params",
                               tiny=dict(width=16, depth=4)),
    "resnet20": ModelEntry(_resnet20, (3, 32, 32),
                           "CIFAR ResNet-20, 16/32/64 channels, BN, option-A shortcuts, 269,722 params"),
    "vit": ModelEntry(_vit, (3, 32, 32),
                      "ViT: patch 4 on 32x32, dim 64, 2 layers, 4 heads, MLP 128, mean pool, "
                      "74,954 params; each block's FFN gated per token",
                      tiny=dict(image_size=8, patch=4, dim=16, depth=1, heads=2, mlp_dim=32)),
    "gpt": ModelEntry(_gpt, (64,),
                      "GPT char LM: vocab 65, context 64, dim 64, 2 layers, 4 heads, MLP 256, "
                      "112,577 params; each block's FFN gated per token",
                      input_dtype=torch.long,
                      tiny=dict(vocab_size=12, seq_len=8, dim=16, depth=1, heads=2, mlp_dim=32)),
    "replicate-1b": ModelEntry(
        _replicate_1b, (1024,),
        "DeepMLP 1024-(4096 x 7)-1024, 109,081,600 params dense; replicate K=16 of the 7 gated "
        "layers gives 1,682,408,448 params with the gate (build under torch.device('meta') to "
        "inspect without memory)",
        sal=dict(area_mode="replicate", areas=16),
        tiny=dict(in_features=16, num_classes=8, width=16, depth=3)),
}


def _entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise SalcompileError(f"unknown model {name!r}; the zoo has: {sorted(REGISTRY)}.")
    return REGISTRY[name]


def _bind(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The factory's keywords with `kwargs` applied (defaults filled in), or ModelArgumentError."""
    sig = inspect.signature(_entry(name).factory)
    try:
        bound = sig.bind(**kwargs)
    except TypeError as exc:
        raise ModelArgumentError(f"model {name!r}: {exc}; its keywords are: "
                                 f"{', '.join(sig.parameters)}.") from exc
    bound.apply_defaults()
    args = dict(bound.arguments)
    _check_sizes(name, args)
    return args


# Every size keyword of a factory: a positive int (depth: layers; the rest: widths, counts).
_SIZE = Int(lo=1, hi=2 ** 24, hint="a positive size; see the entry's description for typical values")
_SIZE_OPTIONAL = Int(lo=1, hi=2 ** 24, optional=True, hint="a positive size, or None for the default")


def _check_sizes(name: str, args: Dict[str, Any]) -> None:
    for key, value in args.items():
        if key == "residual":
            flag(key, value, f"model {name!r}")
        elif key in ("vocab_size", "num_classes") and name == "gpt":
            check(key, value, _SIZE_OPTIONAL, f"model {name!r}")
        else:
            check(key, value, _SIZE, f"model {name!r}")
    if "heads" in args and args["dim"] % args["heads"]:
        raise SalcompileError(f"model {name!r}: dim={args['dim']} must be a multiple of "
                              f"heads={args['heads']}; choose heads dividing dim.")
    if "patch" in args and args["image_size"] % args["patch"]:
        raise SalcompileError(f"model {name!r}: image_size={args['image_size']} must be a multiple "
                              f"of patch={args['patch']}.")


def _check_fits(name: str, kwargs: Dict[str, Any]) -> None:
    """Count the parameters on the meta device, then refuse a model the memory cannot hold."""
    device = torch.get_default_device()
    if device.type == "meta":
        return
    with torch.device("meta"):
        model = _entry(name).factory(**kwargs)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the parameters, their gradients and an optimizer's state: plan for 2x at build time
    check_memory(2 * nbytes, f"model {name!r} ({sum(p.numel() for p in model.parameters()):,} "
                 "parameters)", device, fix="choose smaller widths/depth, or build it under "
                 "torch.device('meta') to inspect it")


def build(name: str, **kwargs: Any) -> nn.Module:
    """A fresh model from the zoo; `kwargs` override the factory's defaults (see REGISTRY)."""
    _bind(name, kwargs)
    _check_fits(name, kwargs)
    return _entry(name).factory(**kwargs)


# named SAL settings every zoo model is checked under (tests/test_compile_zoo.py,
# benchmarks/compile_zoo.py); SAL modes use K=4 so the tiny versions divide
MODES: Dict[str, Dict[str, Any]] = {
    "bp": dict(feedback="bp", areas=1),
    "fa": dict(feedback="fa", areas=1),
    "dfa": dict(feedback="dfa", areas=1),
    "sal-partition": dict(feedback="fa", areas=4, area_mode="partition"),
    "sal-replicate": dict(feedback="fa", areas=4, area_mode="replicate"),
}


def smoke_case(name: str, mode: str, batch: int = 3):
    """(the tiny version of zoo model `name` transformed under MODES[mode], an example batch);
    the entry's own SAL overrides apply to the SAL modes."""
    import salcompile
    entry = _entry(name)
    torch.manual_seed(0)
    model = build(name, **entry.tiny)
    x = example_input(name, batch=batch, **entry.tiny)
    cfg = dict(MODES[mode]) if MODES[mode]["areas"] == 1 else {**entry.sal, **MODES[mode]}
    return salcompile.transform(model, (x,), **cfg), x


def example_input(name: str, batch: int = 2, **kwargs: Any) -> torch.Tensor:
    """A random batch for model `name` built with the same `kwargs` (input size keywords change
    the shape: in_features, in_channels, image_size, seq_len; vocab_size bounds the tokens)."""
    entry = _entry(name)
    args = _bind(name, kwargs)
    shape = list(entry.input_shape)
    if "in_features" in args:
        shape = [args["in_features"]]
    if "in_channels" in args:
        shape[0] = args["in_channels"]
    if "image_size" in args:
        shape[1:] = [args["image_size"]] * (len(shape) - 1)
    if "seq_len" in args:
        shape = [args["seq_len"]]
    if entry.input_dtype.is_floating_point:
        return torch.randn(batch, *shape, dtype=entry.input_dtype)
    vocab = _vocab(args["vocab_size"], args["num_classes"])
    return torch.randint(0, vocab, (batch, *shape), dtype=entry.input_dtype)
