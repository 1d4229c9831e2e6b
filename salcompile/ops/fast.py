"""Eager fast path for salcompile's custom ops (issue 13: per-step overhead at small sizes).

A call of a torch.library custom op with an autograd formula goes through the dispatcher, torch's
generated autograd.Function (argument normalisation, `fill_defaults`, a redispatch below
Autograd, a dynamo-disabled backend wrapper): ~15 µs of Python per call on a CPU core, several
times the arithmetic of a 16-row layer. In plain eager mode none of that machinery does anything,
so SALModule runs a second rendering of its own graph code (`eager_forward`) in which each
salcompile op `torch.ops.salcompile.X.default(...)` is `fast.X(...)`: the op's own Python
implementation, under a small hand-written autograd.Function that calls the op's own
setup_context and backward. The same functions compute the same numbers, bit for bit. An op may
also give its own fast forward (`op.sal_fast_forward(ctx, *args)`: impl + setup in one, e.g.
region_gate keeps its routing logits for its backward instead of recomputing them); it must
return the implementation's outputs bit for bit. And an op may give a native form
(`op.sal_fast_native(*args)`: None, or the same output computed by plain torch ops whose own
autograd gives the op's gradients): an FA layer whose input needs no gradient (a network's
first layer) computes exactly backprop's dW and db, which torch's own linear or convolution node
does with less overhead than a Python backward (about 25 µs a step at the paper's scale).

The fast path is taken only when nothing could observe the difference (`plain_eager`): not
compiling, exporting or jit-tracing, no TorchDispatchMode / TorchFunctionMode, no functorch
transform, autocast off (the ops' Autocast kernels live in the dispatcher), and, per op, every
tensor argument a plain torch.Tensor / nn.Parameter (no FakeTensor, FunctionalTensor, DTensor or
other subclass). Anything else runs the registered op, exactly as before; the graph itself (what
torch.compile, torch.export, save/load and the ONNX exporters read) is unchanged.
"""
from __future__ import annotations

import re
import weakref
from typing import Callable, Dict

import torch
from torch import Tensor, nn

ENABLED = True   # False: always dispatch (tests and benchmarks compare the two)
_PLAIN = (Tensor, nn.Parameter)
_OPS: Dict[str, Callable] = {}          # op name -> fast callable
_IMPL: Dict[object, Callable] = {}      # OpOverload / CustomOpDef -> raw Python implementation
_FORWARDS = weakref.WeakKeyDictionary()  # a GraphModule class's forward -> its eager rendering


try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as frame_callback
except ImportError:   # an older torch: treat every call as possibly compiled (always dispatch)
    def frame_callback():
        return True


def plain_eager() -> bool:
    """True when an op's own Python implementation is indistinguishable from its dispatch."""
    C = torch._C
    if not ENABLED or torch.compiler.is_compiling():   # first: dynamo cannot trace the rest
        return False
    # an eval-frame callback: torch.compile is running, and will compile the frames called from
    # here (SALModule.__call__ itself is skipped, the graph's forward is not)
    return frame_callback() is None and not (
        torch.compiler.is_exporting() or C._get_tracing_state() is not None
        or C._is_any_autocast_enabled() or C._len_torch_dispatch_stack()
        or C._is_torch_function_mode_enabled()
        or C._functorch.peek_interpreter_stack() is not None)


def _plain(args) -> bool:
    """Plain tensors with real data: a subclass or a meta tensor (shapes only: the dispatcher
    runs the op's fake implementation) takes the registered op."""
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.is_meta):
            return False
    return True


def call(ctx, op, *args):
    """op(*args) from inside a registered backward: the raw implementation when the forward ran
    on the fast path (ctx.sal_fast), the registered op otherwise (compile, export, modes)."""
    if getattr(ctx, "sal_fast", False):
        return _IMPL[op](*args)
    return op(*args)


def _register(cdef) -> None:
    """A fast callable for the custom op `cdef` (a torch.library CustomOpDef)."""
    schema = cdef._opoverload._schema
    if set(cdef._backend_fns) - {None} or cdef._torch_dispatch_fns or cdef._vmap_fn or any(
            torch._library.utils.is_tensorlist_like_type(a.type)
            for a in (*schema.arguments, *schema.returns)):
        return   # device-specific kernels, tensor lists or other behaviour: always dispatch
    impl, setup, backward = cdef._init_fn, cdef._setup_context_fn, cdef._backward_fn
    op = cdef._opoverload
    packet = getattr(getattr(torch.ops, cdef._namespace), cdef._name)
    _IMPL[op] = _IMPL[cdef] = _IMPL[packet] = impl
    if backward is None:
        def fast(*args, **kwargs):
            if kwargs or not _plain(args):
                return op(*args, **kwargs)
            return impl(*args)
    else:
        own = getattr(cdef, "sal_fast_forward", None)   # the op's own (impl + setup in one)

        def fwd(ctx, *args):
            ctx.sal_fast = True
            if own is not None:
                return own(ctx, *args)
            out = impl(*args)
            setup(ctx, args, out)
            return out

        native = getattr(cdef, "sal_fast_native", None)   # plain ops, where they are the same
        fn = type(f"Fast_{cdef._name}", (torch.autograd.Function,),
                  {"forward": staticmethod(fwd), "backward": staticmethod(backward)})
        # autograd.Function.apply minus its functorch bookkeeping (unwrap_dead_wrappers; no
        # functorch transform is active here, plain_eager checked)
        apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, fn)
        any_grad = torch._C._any_requires_grad

        def fast(*args, **kwargs):
            if kwargs or not _plain(args):
                return op(*args, **kwargs)
            if torch.is_grad_enabled() and any_grad(*args):
                if native is not None:
                    out = native(*args)
                    if out is not None:
                        return out
                return apply(*args)
            return impl(*args)
    fast.__name__ = cdef._name
    _OPS[cdef._name] = fast


def op(target) -> Callable:
    """The fast callable of a salcompile OpOverload (the op itself when it has none)."""
    return _OPS.get(target._schema.name.split("::")[-1], target)


def register_all() -> None:
    from . import areas, compact, dfa, fa, finite, gate
    for mod in (areas, compact, dfa, fa, finite, gate):
        for v in vars(mod).values():
            if isinstance(v, torch._library.custom_ops.CustomOpDef) and \
                    v._namespace == "salcompile":
                _register(v)


def _direct_attribute_reads(src: str, graph, module) -> str:
    """Each parameter or buffer read of the graph (`getattr(self.layers, "0").weight`: two
    nn.Module.__getattr__ calls, ~1.6 µs, 10-20 of them a step) as the dictionary lookups
    nn.Module.__getattr__ itself does (`self._modules['layers']._modules['0']._parameters
    ['weight']`); a replaced parameter or submodule is still found (the dictionaries are read
    at every call). Anything else (a plain attribute, a constant) keeps its line."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        *path, leaf = node.target.split(".")
        owner, expr = module, "self"
        for name in path:
            owner = owner._modules.get(name) if isinstance(owner, nn.Module) else None
            expr += f"._modules[{name!r}]"
        if not isinstance(owner, nn.Module):
            continue
        if leaf in owner._parameters:
            expr += f"._parameters[{leaf!r}]"
        elif leaf in owner._buffers:
            expr += f"._buffers[{leaf!r}]"
        else:
            continue
        src = re.sub(rf"^(    {re.escape(node.name)} = )(getattr\(self\b|self\.)[^;\n]*",
                     lambda m: m.group(1) + expr, src, count=1, flags=re.M)
    return src


def eager_forward(module) -> Callable:
    """module's generated forward with salcompile ops called through the fast path (cached per
    generated forward: a recompile() of the graph makes a new one)."""
    cls_forward = type(module).forward
    fast = _FORWARDS.get(cls_forward)
    if fast is None:
        from . import fast_region
        graph, regions = fast_region.rewrite(module.graph)
        names = {}
        src = module.code
        if regions:   # regions with a masked-dense few-rows path (fast_region.py)
            code = graph.python_code("self")
            src = code.src
            names.update(code.globals)
        for name in _OPS:
            qual = f"torch.ops.salcompile.{name}.default("
            if qual in src:
                names[f"_sal_fast_{name}"] = _OPS[name]
                src = src.replace(qual, f"_sal_fast_{name}(")
        # aten ops: their C++ entry point directly, without OpOverload.__call__'s Python frame
        for qual in sorted(set(re.findall(r"torch\.ops\.aten\.\w+\.\w+\(", src))):
            name, overload = qual[len("torch.ops.aten."):-1].split(".")
            op = getattr(getattr(torch.ops.aten, name), overload, None)
            entry = getattr(op, "_op", None)
            if callable(entry):
                names[f"_aten_{name}_{overload}"] = entry
                src = src.replace(qual, f"_aten_{name}_{overload}(")
        src = _direct_attribute_reads(src, graph, module)
        # the input guards (torch.export's _guards_fn submodule): its forward, without
        # nn.Module.__call__ (nothing hooks it). Not the guard function inside it: reaching that
        # means reading torch's private closures, for ~4 µs
        src = src.replace("self._guards_fn(", "self._modules['_guards_fn'].forward(")
        glb = dict(cls_forward.__globals__)
        glb.update(names)
        loc: dict = {}
        exec(compile(src, f"<salcompile eager {cls_forward.__code__.co_filename}>", "exec"),
             glb, loc)
        fast = loc["forward"]
        _FORWARDS[cls_forward] = fast
    return fast
