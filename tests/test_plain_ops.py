"""salcompile/ops/plain.py: the one "FA op → plain op" mapping equals each op's own forward, and
its three users (strip_feedback, the ONNX inference graph, the train-step decompositions) read it."""
import torch

import salcompile  # noqa: F401  (registers the ops)
from salcompile.ops.plain import plain_call, plain_forwards

s = torch.ops.salcompile


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)   # noqa: E731
    w2 = r(4, 3, 3, 3)
    conv = lambda x, w, transposed=False, out_pad=(0, 0): (   # noqa: E731
        x, w, r(w.shape[1] if transposed else w.shape[0]), r(*w.shape), [1, 1], [1, 1], [1, 1],
        transposed, list(out_pad), 1, False)
    return [
        (s.fa_linear.default, (r(5, 3), r(4, 3), r(4), r(4, 3), False)),
        (s.fa_linear.default, (r(2, 5, 3), r(4, 3), None, r(4, 3), True)),
        (s.fa_conv.default, conv(r(2, 3, 6, 6), w2)),
        (s.fa_conv.default, conv(r(3, 6, 6), w2)),                    # unbatched input
        (s.fa_conv.default, conv(r(2, 4, 5, 5), w2, transposed=True)),
        (s.fa_matmul.default, (r(2, 5, 3), r(3, 4), r(3, 4), False, False)),
        (s.fa_matmul.default, (r(3, 6), r(4, 3), r(4, 3), True, False)),
        (s.fa_einsum.default, ("bi,oi->bo", r(5, 3), r(4, 3), r(4, 3), False, False)),
        (s.fa_einsum.default, ("oi,bi->bo", r(5, 3), r(4, 3), r(4, 3), True, False)),
    ]


def test_plain_call_equals_each_fa_ops_forward():
    for op, args in _cases():
        fn, plain_args = plain_call(op, args)
        assert not any(a is args[[x.name for x in op._schema.arguments].index("feedback")]
                       for a in plain_args if isinstance(a, torch.Tensor)), op
        torch.testing.assert_close(fn(*plain_args), op(*args), rtol=0, atol=0)
        torch.testing.assert_close(plain_forwards()[op](*args), op(*args), rtol=0, atol=0)


def test_keyword_arguments_are_read_by_name():
    op, args = _cases()[0]
    names = [a.name for a in op._schema.arguments]
    fn, plain_args = plain_call(op, args[:2], dict(zip(names[2:], args[2:])))
    torch.testing.assert_close(fn(*plain_args), op(*args), rtol=0, atol=0)


def test_other_targets_have_no_plain_form():
    assert plain_call(torch.ops.aten.linear.default, ()) is None
    assert plain_call(s.fa_grouped_mm.default, ()) is None   # per consumer, see plain.py


def test_strip_feedback_and_the_onnx_graph_handle_an_unbatched_conv():
    # aten.convolution refuses an unbatched input; the shared mapping handles it (it once did
    # only in the train-step decompositions)
    import torch.fx as fx
    from salcompile.onnx import inference_graph
    from salcompile.passes import strip_feedback

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu().sum(0).flatten()

    net = Net()
    x = torch.randn(3, 6, 6)
    sal = salcompile.transform(net, example_inputs=(x,), areas=1)
    assert any(n.target is s.fa_conv.default for n in sal.graph.nodes)
    ref = fx.GraphModule(sal, strip_feedback(sal.graph))
    assert not any(n.target is s.fa_conv.default for n in ref.graph.nodes)
    torch.testing.assert_close(ref(x), net(x))
    torch.testing.assert_close(inference_graph(sal)(x), net(x))


def test_every_fa_layer_op_has_one_family_entry():
    # salcompile/families.py is the one table of layer families: each fa_* layer op has an entry
    from salcompile.families import FAMILIES, by_fa_op
    layer_ops = {n for n in dir(s) if n.startswith("fa_") and not n.endswith("_backward")}
    assert layer_ops == {f.fa_op for f in FAMILIES.values()}
    for f in FAMILIES.values():
        assert by_fa_op(f.op) is f


def test_fan_in_per_family_weight_layout():
    from salcompile.feedback_init import fan_in
    assert fan_in("linear", (8, 5)) == 5
    assert fan_in("conv", (8, 3, 3, 3)) == 27
    assert fan_in("matmul", (5, 8)) == 5                       # x @ W, W [in, out]
    assert fan_in("matmul", (8, 5), weight_first=True) == 5    # W @ x, W [out, in]
    assert fan_in("grouped_mm", (4, 6, 8)) == 6                # [experts, in, out]
    assert fan_in("einsum", (8, 2, 3)) == 6
