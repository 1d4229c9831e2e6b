"""The pieces of export_train_step's step graph: the module's graph made traceable in training
mode, aten forms of the ops the ONNX exporter cannot translate, the loss and the optimizers.

Graph-level replacements (before autograd, so their backward is made of ordinary ops):
  fast area ops -> their masked-dense references (linear ones kept with routed_form="compact",
  exported by onnx/compact.py); scaled_dot_product_attention -> matmul +
  softmax; batch norm -> mean/var arithmetic with the running-statistics update written out.
Trace-level decompositions (make_fx's decomposition_table, below autograd): the salcompile custom
ops' forwards, and aten.convolution_backward as convolutions.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import SalcompileError

aten = torch.ops.aten
WHO = "export_train_step"
_WHO = WHO


# ---------------------------------------------------------------- making the graph traceable
def _trainable_graph(sal, routed_form: str = "masked") -> fx.GraphModule:
    """A copy of `sal` (sharing its parameters) whose graph make_fx can trace in training mode:
    no routing counters, no finite checks, masked-dense area ops (routed_form="masked"), or with
    "compact" the fast area_linear op kept (reference ones become it: the same outputs and
    gradients), which onnx/compact.py exports in the sorted compact form; area convolutions are
    masked-dense in both."""
    from ..ops import areas as area_ops
    s = torch.ops.salcompile
    from ..passes.fuse_regions import unfuse_regions
    g = unfuse_regions(sal.graph)   # a copy; fused regions back to one area op per layer
    swap = {s.area_linear.default: area_ops.area_linear_reference,
            s.area_conv.default: area_ops.area_conv_reference}
    if routed_form == "compact":
        swap = {area_ops.area_linear_reference: s.area_linear.default,
                s.area_conv.default: area_ops.area_conv_reference}
    for node in list(g.nodes):
        t = node.target
        if node.op == "call_module" and t == "_guards_fn":
            g.erase_node(node)
        elif node.op != "call_function":
            continue
        elif t is s.count_routes.default:
            g.erase_node(node)
        elif t is s.check_finite.default:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
        elif t in swap:
            node.target = swap[t]
        elif t in _SDPA:
            node.target = _sdpa_math
        elif t is aten.batch_norm.default:
            node.target = _batch_norm
        elif t is F.batch_norm:
            node.target = _functional_batch_norm
    for node in list(g.nodes):   # modules left as calls (symbolic_trace captures)
        mod = sal.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            _inline_batch_norm(g, node, mod)
        elif isinstance(mod, torch.nn.modules.dropout._DropoutNd):
            _drop(g, node, mod.p, mod)
        elif node.op == "call_function" and node.target in _DROPOUT:
            a = list(node.args) + [None] * 2
            _drop(g, node, node.kwargs.get("p", 0.5 if a[1] is None else a[1]))
        elif node.op == "call_function" and "bernoulli" in str(node.target):
            raise SalcompileError(f"{WHO}: random sampling ({node.name}) is not supported: "
                                  "onnxruntime cannot reproduce torch's random numbers.")
    g.lint()
    gm = fx.GraphModule(sal, g, class_name="SALTrainStep")
    gm.train()
    return gm


_SDPA = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
_DROPOUT = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
            aten.feature_alpha_dropout.default, aten.native_dropout.default, F.dropout,
            F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


_FEATURE_DROPOUT = (aten.feature_dropout.default, F.dropout1d, F.dropout2d, F.dropout3d)
_ALPHA_DROPOUT = (aten.alpha_dropout.default, aten.feature_alpha_dropout.default, F.alpha_dropout,
                  F.feature_alpha_dropout, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def inverted_dropout(x: torch.Tensor, p: float, feature: bool) -> torch.Tensor:
    """Training-mode dropout in ops the ONNX exporter writes as RandomUniformLike: every step
    draws a fresh mask in onnxruntime, with torch's distribution (keep with probability 1-p,
    kept values scaled by 1/(1-p); per channel for the feature forms), not torch's numbers."""
    if p >= 1:
        return x * 0
    like = x[(slice(None), slice(None)) + (slice(0, 1),) * (x.dim() - 2)] if feature else x
    keep = (torch.rand_like(like) >= p).to(x.dtype)
    return x * keep * (1.0 / (1.0 - p))


def _drop(g: fx.Graph, node: fx.Node, p, module=None) -> None:
    """Dropout: the identity for p=0, inverted_dropout otherwise (alpha dropout is refused)."""
    kind = type(module) if module is not None else node.target
    if isinstance(p, fx.Node) or kind in _ALPHA_DROPOUT or \
            node.target is aten.native_dropout.default:
        raise SalcompileError(
            f"{WHO}: dropout {node.name} ({getattr(kind, '__name__', kind)}, p={p}) is not "
            "supported in the train-step graph (only plain and channel dropout with a constant "
            "p are). Set its probability to 0 (or remove it) before salcompile.transform, or "
            "train in torch.")
    if p == 0:
        node.replace_all_uses_with(node.args[0])
        g.erase_node(node)
        return
    feature = kind in _FEATURE_DROPOUT or isinstance(module, (torch.nn.Dropout1d,
                                                              torch.nn.Dropout2d,
                                                              torch.nn.Dropout3d))
    with g.inserting_before(node):
        new = g.call_function(inverted_dropout, (node.args[0], float(p), feature))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    g.erase_node(node)


def _sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """scaled_dot_product_attention written with matmul and softmax: torch's fused CPU kernel
    has a backward op the ONNX exporter cannot translate."""
    if dropout_p:
        raise SalcompileError(f"{_WHO}: attention dropout (dropout_p={dropout_p}) is not "
                              "supported: its random mask cannot be reproduced in ONNX Runtime.")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.matmul(k.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask
    return torch.softmax(s, -1).matmul(v)


def _conv_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed,
                   output_padding, groups, mask):
    """aten.convolution_backward (which the exporter cannot translate) as convolutions:
    dX a transposed convolution of dY with the weight operand (B for FA layers), dW a convolution
    of X with dY over the batch (grouped: the diagonal blocks of the all-pairs result)."""
    if transposed:
        raise SalcompileError(f"{_WHO}: transposed convolutions are not supported yet (their "
                              "backward has no ONNX form here).")
    nd = len(stride)
    k = list(weight.shape[2:])
    gx = gw = gb = None
    if mask[0]:
        pad_out = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                     + dilation[i] * (k[i] - 1) + 1) for i in range(nd)]
        gx = aten.convolution(grad, weight, None, stride, padding, dilation, True, pad_out,
                              groups)
    if mask[1]:
        r = aten.convolution(x.transpose(0, 1), grad.transpose(0, 1), None, dilation, padding,
                             stride, False, [0] * nd, 1)          # [C_in, C_out, *k']
        r = r[(slice(None), slice(None)) + tuple(slice(0, kk) for kk in k)]
        if groups == 1:
            gw = r.transpose(0, 1)
        else:
            ci, co = x.shape[1] // groups, grad.shape[1] // groups
            r = torch.diagonal(r.reshape([groups, ci, groups, co] + k), 0, 0, 2)
            gw = r.movedim(-1, 0).transpose(1, 2).reshape([groups * co, ci] + k)
        gw = gw.contiguous()
    if mask[2]:
        gb = grad.sum([0] + list(range(2, grad.dim())))
    return gx, gw, gb


def _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
                cudnn_enabled=True):
    """aten.batch_norm with plain ops: the exporter writes training-mode batch norm as an ONNX
    BatchNormalization without training_mode, which onnxruntime runs on the running statistics
    (measured: a different loss)."""
    if not training and running_mean is not None:
        return torch.ops.aten.batch_norm.default(x, weight, bias, running_mean, running_var,
                                                 False, momentum, eps, cudnn_enabled)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = (x - mean.reshape(shape)).square().mean(dims)   # not x.var: its 1/N is a symbolic
    if running_mean is not None:                          # scalar the exporter cannot take
        with torch.no_grad():
            n = torch.ones_like(x[:, 0]).sum()            # rows per channel, as a tensor
            running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)) * momentum)
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _functional_batch_norm(input, running_mean, running_var, weight=None, bias=None,
                           training=False, momentum=0.1, eps=1e-5):
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)


def _module_batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked,
                       momentum: float, eps: float):
    """nn.BatchNorm*'s training-mode forward (the train step always runs in training mode)."""
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    return _batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)


def _inline_batch_norm(g: fx.Graph, node: fx.Node, mod) -> None:
    if mod.momentum is None:
        raise SalcompileError(f"{_WHO}: batch norm {node.target} uses momentum=None (a "
                              "cumulative average); set a momentum.")
    if len(node.args) != 1 or node.kwargs:
        raise SalcompileError(f"{_WHO}: unexpected call of batch norm {node.target}.")
    with g.inserting_before(node):
        attrs = [g.get_attr(f"{node.target}.{a}") if getattr(mod, a, None) is not None else None
                 for a in ("weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked")]
        new = g.call_function(_module_batch_norm, (node.args[0], *attrs, float(mod.momentum),
                                                   float(mod.eps)))
    node.replace_all_uses_with(new)
    g.erase_node(node)


def _route(features, proj, prototypes, temperature, balance_weight):
    """The gate's forward: (argmax areas, the zero anchor)."""
    from ..ops.gate import route
    return route(features, proj, prototypes), proj.new_zeros(())


def _route_topk(features, proj, prototypes, temperature, balance_weight, k):
    """The top-k gate's forward: (each row's k best areas, the zero anchor)."""
    from ..ops.gate import route_topk
    return route_topk(features, proj, prototypes, k), proj.new_zeros(())


def _decompositions() -> Dict[Any, Any]:
    """Each salcompile custom op met while tracing -> an aten form of its forward. The backward
    formulas registered with autograd run above this level and are traced op by op."""
    from ..ops.plain import plain_forwards   # the FA layer ops' forwards, one place
    s = torch.ops.salcompile
    return {
        **plain_forwards(),
        s.dfa_output.default: lambda out, taps, fb: out.clone(),
        s.region_gate.default: _route,
        s.region_gate_topk.default: _route_topk,
        s.global_route_counts.default: lambda c: torch.cat([c, c.new_ones(1)]),
        aten.convolution_backward.default: _conv_backward,
        # ReLU's backward as one product with its mask (onnxruntime's Where with a scalar
        # branch is a slow broadcast); threshold_backward's value wherever dY is finite
        aten.threshold_backward.default: lambda g, x, t: g * (x > t).to(g.dtype),
        aten.one_hot.default: lambda t, n=-1: (t.unsqueeze(-1) == torch.arange(
            n, device=t.device)).to(torch.long),
    }


# ---------------------------------------------------------------- loss and optimizers
def _loss(kind: str, out, target):
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            raise SalcompileError(f"{_WHO}: the module must return one tensor (the loss is "
                                  f"computed on it), not {len(out)} outputs.")
        out = out[0]
    # Written out: the exporter's translation of nll_loss_backward drops the 1/N of the mean
    # (measured: every update N times too large).
    if kind == "cross_entropy":
        logp = torch.log_softmax(out.reshape(-1, out.shape[-1]), -1)
        return -logp.gather(1, target.reshape(-1, 1).to(torch.long)).mean()
    return (out - target.to(out.dtype)).square().mean()


class _Optimizer:
    """torch.optim.SGD / AdamW (single-tensor, non-capturable) written out on tensors."""

    def __init__(self, kind: str, lr: float, weight_decay: Optional[float], betas, eps: float,
                 momentum: float, nesterov: bool):
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), tuple(betas), float(eps)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        if weight_decay is None:
            weight_decay = 1e-2 if kind == "adamw" else 0.0
        self.weight_decay = float(weight_decay)
        if self.lr < 0 or self.weight_decay < 0 or self.eps < 0 or self.momentum < 0:
            raise SalcompileError(f"{_WHO}: lr, weight_decay, eps and momentum must be >= 0.")
        if kind == "adamw" and not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise SalcompileError(f"{_WHO}: betas must be two numbers in [0, 1), got {betas!r}.")
        if nesterov and (kind != "sgd" or self.momentum <= 0):
            raise SalcompileError(f"{_WHO}: nesterov needs optimizer='sgd' with momentum > 0.")

    def describe(self) -> str:
        if self.kind == "adamw":
            return (f"lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                    f"weight_decay={self.weight_decay}")
        return (f"lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay}")

    def slots(self) -> Tuple[str, ...]:
        if self.kind == "adamw":
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.momentum else ()

    def update(self, p, g, state: List, step):
        """(new p, new state) for one parameter; `step` is the new step count (1 on the first)."""
        lr, wd = self.lr, self.weight_decay
        if self.kind == "sgd":
            if wd:
                g = g + wd * p
            if self.momentum:
                # dampening 0: the first step's buf = g equals momentum·0 + g
                buf = state[0] * self.momentum + g
                g = g + self.momentum * buf if self.nesterov else buf
                state = [buf]
            return p - lr * g, state
        b1, b2 = self.betas
        m, v = state
        p = p * (1 - lr * wd)
        m = m + (g - m) * (1 - b1)              # torch: exp_avg.lerp_(grad, 1 - beta1)
        v = v * b2 + g * g * (1 - b2)
        s64 = step.to(torch.float64)            # torch computes bias corrections in double
        c1 = 1 - torch.pow(b1, s64)
        c2 = 1 - torch.pow(b2, s64)
        step_size = (lr / c1).to(p.dtype)
        c2_sqrt = c2.sqrt().to(p.dtype)
        if lr > 0:   # step_size folded into the (scalar) factors of the denominator: one
            # pass over the parameter fewer; the same value up to rounding
            denom = v.sqrt() * (1.0 / (c2_sqrt * step_size)) + self.eps / step_size
            return p - m / denom, [m, v]
        denom = v.sqrt() / c2_sqrt + self.eps
        return p - step_size * (m / denom), [m, v]
