"""Dynamic shapes: a sequence model captured with example inputs takes other sequence lengths
(eager, SAL areas, torch.compile, ONNX); a dimension the capture fixed is a SalcompileError that
names it and says how to capture anew. Also: the ONNX exporter's real cause reaches the error."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from conftest import ResCNN, assert_grads_equal, grads, loss_of, mlp
from salcompile.models import REGISTRY, build

D = torch.float64
TINY = REGISTRY["gpt"].tiny          # vocab 12, context 8
FA_IS_BP = dict(feedback="fa", feedback_init="weights", feedback_scale="none")


def transform(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salcompile.transform(model, (x,), **kw)


def gpt():
    torch.manual_seed(0)
    return build("gpt", **TINY).to(D)


def tokens(b, t):
    return torch.randint(0, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(t))


def placeholder_shapes(sal):
    return [n.meta["val"].shape for n in sal.graph.nodes if n.op == "placeholder"]


def is_dynamic(size):
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)


# ---------------------------------------------------------------------------------- capture
def test_gpt_takes_other_sequence_lengths_with_the_original_gradients():
    model, x = gpt(), tokens(2, 8)
    sal = transform(model, x, areas=1, **FA_IS_BP)
    (shape,) = placeholder_shapes(sal)
    assert is_dynamic(shape[0]) and is_dynamic(shape[1])
    for t in (tokens(3, 5), tokens(2, 1), tokens(1, 8)):
        torch.testing.assert_close(sal(t), model(t), rtol=0, atol=0)
        assert_grads_equal(grads(sal, t), grads(model, t))


def test_gpt_past_its_context_is_a_clear_error():
    sal = transform(gpt(), tokens(2, 8), areas=1)
    with pytest.raises(salcompile.SalcompileError) as info:
        sal(tokens(2, 9))
    msg = str(info.value)
    assert "dimension 1 of input `tokens` at most 8, and was called with size 9" in msg, msg
    assert "example_inputs" in msg and "table of positions" in msg, msg


def test_gpt_dfa_with_a_dynamic_sequence():
    model, x = gpt(), tokens(2, 8)
    sal = transform(model, x, areas=1, feedback="dfa")
    assert sal.sal_plan.dfa_taps
    for t in (x, tokens(3, 5)):
        loss_of(sal(t)).backward()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_gpt_sal_areas_with_a_dynamic_sequence(mode):
    sal = transform(gpt(), tokens(2, 8), areas=4)
    ref = transform(gpt(), tokens(2, 8), areas=4)   # the same module, run eagerly
    run = sal
    if mode == "compile":
        torch._dynamo.reset()
        run = salcompile.compile(sal, backend="aot_eager")
    for t in (tokens(2, 8), tokens(3, 5), tokens(2, 3)):
        torch.testing.assert_close(run(t), ref(t), rtol=1e-9, atol=1e-10)
        assert_grads_equal(grads(run, t), grads(ref, t))


def test_dims_the_model_fixes_stay_static_and_say_so():
    cases = [("mlp", mlp().to(D), torch.randn(4, 8, dtype=D), torch.randn(4, 7, dtype=D),
              [8]),
             ("cnn", ResCNN().to(D), torch.randn(3, 3, 6, 6, dtype=D),
              torch.randn(3, 4, 6, 6, dtype=D), [3, 6, 6])]
    for name, model, x, bad, static in cases:
        sal = transform(model, x, areas=1)
        (shape,) = placeholder_shapes(sal)
        assert is_dynamic(shape[0]) and list(shape[1:]) == static, (name, shape)
        assert sal(x[:2]).shape[0] == 2                     # the batch still varies
        with pytest.raises(salcompile.SalcompileError, match=r"dimension 1 of input `x` fixed "
                           rf"at {static[0]}, and was called with size {bad.shape[1]}"):
            sal(bad)


def test_a_sequence_of_one_in_the_example_is_fixed_at_one():
    model = gpt()
    sal = transform(model, tokens(2, 1), areas=1)
    assert sal(tokens(3, 1)).shape == (3, 1, TINY["vocab_size"])
    with pytest.raises(salcompile.SalcompileError) as info:
        sal(tokens(2, 4))
    msg = str(info.value)
    assert "fixed at 1, and was called with size 4" in msg and "size 1" in msg, msg


class PerToken(nn.Module):
    """[B, T, F] float features, per-token output [B, T, C]."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class Pooled(nn.Module):
    """A sequence classifier: [B, T, F] to [B, C] (the sequence is averaged away)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).mean(1))


def test_float_sequences_per_token_dynamic_pooled_static():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=D)
    per_token = PerToken().to(D)
    sal = transform(per_token, x, areas=1, **FA_IS_BP)
    x7 = torch.randn(3, 7, 6, dtype=D)
    assert_grads_equal(grads(sal, x7), grads(per_token, x7))
    # the classifier keeps the example's length (DFA sizes its D over it), and DFA still works
    sal = transform(Pooled().to(D), x, areas=1, feedback="dfa")
    (shape,) = placeholder_shapes(sal)
    assert shape[1] == 5 and sal.sal_plan.dfa_taps
    loss_of(sal(x)).backward()
    with pytest.raises(salcompile.SalcompileError, match="a sequence classifier"):
        sal(x7)


class NeedsStaticLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if not isinstance(x.shape[1], int):
            raise TypeError("this model needs a concrete sequence length")
        return self.a(x)


def test_export_failing_with_a_dynamic_sequence_falls_back_to_the_batch_with_a_warning():
    x = torch.randn(2, 5, 4)
    with pytest.warns(UserWarning, match=r"could not keep dimension 1 .*concrete sequence length"
                                         r".*capture with an example of the size you need"):
        sal = salcompile.transform(NeedsStaticLength(), (x,), areas=1)
    assert sal(torch.randn(3, 5, 4)).shape == (3, 5, 4)
    with pytest.raises(salcompile.SalcompileError, match="fixed at 5"):
        sal(torch.randn(3, 6, 4))


# ---------------------------------------------------------------------------------- hugging face
def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                      n_positions=32, use_cache=False)).to(D).train()


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        use_cache=False)).to(D).train()


@pytest.mark.parametrize("make", [_hf_gpt2, _hf_llama], ids=["gpt2", "llama"])
def test_hugging_face_lms_take_other_sequence_lengths(make):
    pytest.importorskip("transformers")
    model = make()
    for p in model.modules():   # dropout off: compare exactly
        if isinstance(p, nn.Dropout):
            p.p = 0.0
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    sal = transform(model, ids, areas=1, feedback="bp")
    for t in (ids, ids[:, :5], torch.randint(0, 50, (3, 12))):
        torch.testing.assert_close(sal(t).logits, model(t).logits, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------- ONNX
def test_onnx_export_takes_other_sequence_lengths_and_keeps_fixed_dims(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, x = build("gpt", **TINY), tokens(2, 8)
    for areas in (1, 4):
        sal = transform(model, x, areas=areas)
        path = tmp_path / f"gpt{areas}.onnx"
        salcompile.export_onnx(sal, (x,), path)
        session = ort.InferenceSession(str(path))
        (inp,) = session.get_inputs()
        assert all(isinstance(d, str) for d in inp.shape), inp.shape
        sal.eval()
        for t in (tokens(2, 5), tokens(3, 6)):
            (y,) = session.run(None, {inp.name: t.numpy()})
            torch.testing.assert_close(torch.from_numpy(y), sal(t).detach(), rtol=1e-4,
                                       atol=1e-5)
    sal = transform(mlp(), torch.randn(4, 8), areas=1)
    salcompile.export_onnx(sal, (torch.randn(4, 8),), tmp_path / "mlp.onnx")
    (inp,) = ort.InferenceSession(str(tmp_path / "mlp.onnx")).get_inputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1] == 8, inp.shape


def test_onnx_export_falls_back_to_the_batch_with_a_warning(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    from salcompile.onnx import common as onnx_export
    real = onnx_export.dynamo_export

    def refuses_dynamic_sequences(gm, args, dynamic_shapes, who, *rest):
        if any(isinstance(d, dict) and 1 in d for d in dynamic_shapes or ()):
            raise salcompile.SalcompileError(f"{who}: the ONNX exporter failed: Boom: no.")
        return real(gm, args, dynamic_shapes, who, *rest)

    monkeypatch.setattr(onnx_export, "dynamo_export", refuses_dynamic_sequences)
    x = tokens(2, 8)
    sal = transform(build("gpt", **TINY), x, areas=1)
    with pytest.warns(UserWarning, match="Boom: no.*only the example's sequence length"):
        salcompile.export_onnx(sal, (x,), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------- exporter errors
@torch.library.custom_op("salcompile_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class UsesAnOpWithoutOnnx(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.salcompile_test.twice(self.a(x))


def test_export_onnx_error_carries_the_exporters_real_cause(tmp_path):
    pytest.importorskip("onnxscript")
    sal = transform(UsesAnOpWithoutOnnx(), torch.randn(3, 4), areas=1)
    with pytest.raises(salcompile.SalcompileError) as info:
        salcompile.export_onnx(sal, (torch.randn(3, 4),), tmp_path / "m.onnx")
    msg = str(info.value)
    # was: "the ONNX exporter failed (ConversionError: (Refer to the full stack trace above ...))"
    assert "DispatchError: No ONNX function found for" in msg, msg
    assert "salcompile_test.twice" in msg and "no ONNX translation" in msg, msg
    assert not (tmp_path / "m.onnx").exists()


def test_exporter_error_reads_the_cause_chain():
    from salcompile.onnx.common import exporter_error, failure_cause
    try:
        try:
            try:
                raise KeyError("the op aten::frob has no kernel")
            except KeyError as inner:
                raise RuntimeError("Error when translating node %frob: see above") from inner
        except RuntimeError as mid:
            raise ValueError("\x1b[96mFailed to convert\x1b[0m\n(Refer to the stack trace)") \
                from mid
    except ValueError as exc:
        err = exporter_error("export_onnx", exc)
        cause = failure_cause(exc)
    assert cause.startswith("KeyError: 'the op aten::frob has no kernel'"), cause
    assert "translating node %frob" in cause, cause
    assert str(err).startswith("export_onnx: the ONNX exporter failed: KeyError:"), str(err)
    assert "(reported as ValueError)" in str(err) and "\x1b" not in str(err)
    # no chain: the exporter's own telling line, as before
    plain = exporter_error("w", RuntimeError("header\nTypeError: bad arg\nfooter"))
    assert str(plain) == "w: the ONNX exporter failed: RuntimeError: TypeError: bad arg."


def test_a_saved_archive_keeps_the_sequence_dynamic(tmp_path):
    """salcompile.save exports batch and sequence dynamic: the reloaded module takes another
    length, in train and eval mode, with the saved module's outputs and gradients."""
    sal = transform(gpt(), tokens(2, 8), areas=4)
    salcompile.save(sal, (tokens(2, 8),), tmp_path / "gpt.pt2")
    back = salcompile.load(tmp_path / "gpt.pt2")
    t = tokens(3, 5)
    for mode in ("train", "eval"):
        getattr(sal, mode)()
        getattr(back, mode)()
        torch.testing.assert_close(back(t), sal(t))
    sal.train()
    back.train()
    mine, theirs = dict(sal.named_parameters()), dict(back.named_parameters())
    g0 = torch.autograd.grad(sal(t).square().mean(), list(mine.values()))
    g1 = torch.autograd.grad(back(t).square().mean(), [theirs[n] for n in mine])
    for n, a, b in zip(mine, g0, g1):
        torch.testing.assert_close(b, a, msg=n)


def test_a_reloaded_archive_called_outside_its_shapes_says_which_dimension(tmp_path):
    sal = transform(mlp(), torch.randn(4, 8), areas=1)
    salcompile.save(sal, (torch.randn(4, 8),), tmp_path / "mlp.pt2")
    back = salcompile.load(tmp_path / "mlp.pt2")
    back(torch.randn(3, 8))
    with pytest.raises(salcompile.SalcompileError, match="dimension 1 of input .* fixed at 8"):
        back(torch.randn(3, 5))
