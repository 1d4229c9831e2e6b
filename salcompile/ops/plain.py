"""Each FA layer op's forward as the plain torch op: the one mapping "salcompile op → plain op".

An FA layer op (fa_linear, fa_conv, fa_matmul, fa_einsum) computes exactly its plain op in the
forward; only its backward differs. Three places need that plain op and read it here:
  * passes/strip_feedback.py: the same graph trained by backprop (the metrics' reference);
  * salcompile/onnx/inference.py: the inference graph handed to the ONNX exporter;
  * salcompile/onnx/train_step_graph.py: make_fx decompositions (the op's forward in aten ops,
    below the autograd formula that is traced op by op).

    fn, args = plain_call(node.target, node.args, node.kwargs)   # None: not an FA layer op

`fa_grouped_mm` is not here: its plain form differs per consumer (strip_feedback keeps the op
with B = W, whose own backward is backprop's; ONNX has no grouped matmul and gets a masked-dense
form).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

aten = torch.ops.aten


def conv(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """aten.convolution, also for an unbatched input (which aten.convolution refuses)."""
    if x.dim() == len(stride) + 1:
        return aten.convolution(x.unsqueeze(0), weight, bias, stride, padding, dilation,
                                transposed, output_padding, groups).squeeze(0)
    return aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
                            output_padding, groups)


def _linear(a):
    return aten.linear.default, (a["x"], a["weight"], a["bias"])


def _conv(a):
    return conv, (a["x"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"],
                  a["transposed"], a["output_padding"], a["groups"])


def _matmul(a):
    w, x = a["weight"], a["x"]
    return aten.matmul.default, (w, x) if a["weight_first"] else (x, w)


def _einsum(a):
    w, x = a["weight"], a["x"]
    return aten.einsum.default, (a["equation"], [w, x] if a["weight_first"] else [x, w])


def _table() -> Dict[Any, Callable]:
    s = torch.ops.salcompile
    return {s.fa_linear.default: _linear, s.fa_conv.default: _conv,
            s.fa_matmul.default: _matmul, s.fa_einsum.default: _einsum}


def _bind(target, args, kwargs) -> Dict[str, Any]:
    names = [a.name for a in target._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs or {})
    return bound


def plain_call(target, args, kwargs=None) -> Optional[Tuple[Callable, tuple]]:
    """(the plain op, its arguments) computing the forward of FA layer op `target` called with
    `args`/`kwargs`; None when `target` is not an FA layer op. The feedback is not among them."""
    build = _table().get(target)
    return None if build is None else build(_bind(target, args, kwargs))


def plain_forwards() -> Dict[Any, Callable]:
    """{FA layer op: a function of the op's own arguments computing its forward with the plain
    op}: make_fx decompositions."""
    def forward(target):
        def run(*args, **kwargs):
            fn, plain_args = plain_call(target, args, kwargs)
            return fn(*plain_args)
        return run
    return {t: forward(t) for t in _table()}


__all__ = ["conv", "plain_call", "plain_forwards"]
