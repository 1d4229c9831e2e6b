"""Each FA layer op's forward as the plain torch op: the one mapping "salcompile op → plain op".

An FA layer op (fa_linear, fa_conv, fa_matmul, fa_einsum) computes exactly its plain op in the
forward; only its backward differs. Three places need that plain op and read it here:
  * passes/strip_feedback.py: the same graph trained by backprop (the metrics' reference);
  * salcompile/onnx/inference.py: the inference graph handed to the ONNX exporter;
  * salcompile/onnx/train_step_graph.py: make_fx decompositions (the op's forward in aten ops,
    below the autograd formula that is traced op by op).

    fn, args = plain_call(node.target, node.args, node.kwargs)   # None: not an FA layer op

The forms themselves are the layer families' `plain` entries (salcompile/families.py).
`fa_grouped_mm` has none: its plain form differs per consumer (strip_feedback keeps the op with
B = W, whose own backward is backprop's; ONNX has no grouped matmul and gets a masked-dense form).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

from ..layers import bind_call


@functools.lru_cache(maxsize=None)
def _table() -> Dict[Any, Callable]:
    from ..families import FAMILIES   # each family's plain form lives in its entry
    return {f.op: f.plain for f in FAMILIES.values() if f.plain is not None}


def plain_call(target, args, kwargs=None) -> Optional[Tuple[Callable, tuple]]:
    """(the plain op, its arguments) computing the forward of FA layer op `target` called with
    `args`/`kwargs`; None when `target` is not an FA layer op. The feedback is not among them."""
    build = _table().get(target)
    return None if build is None else build(bind_call(target, args, kwargs))


def plain_forwards() -> Dict[Any, Callable]:
    """{FA layer op: a function of the op's own arguments computing its forward with the plain
    op}: make_fx decompositions."""
    def forward(target):
        def run(*args, **kwargs):
            fn, plain_args = plain_call(target, args, kwargs)
            return fn(*plain_args)
        return run
    return {t: forward(t) for t in _table()}


__all__ = ["plain_call", "plain_forwards"]
