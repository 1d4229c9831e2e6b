"""Mixed precision: salcompile's layer ops follow torch.autocast like the aten ops they replace.

Under `torch.autocast(device, dtype)` aten's linear, conv, matmul and einsum run in the autocast
dtype (bfloat16 or float16); a custom op is left alone unless it says otherwise, so an FA layer
would meet a bfloat16 activation and a float32 weight and fail, or silently run in float32. Each
layer op below gets an Autocast kernel that casts its floating inputs (activation, weight, bias,
feedback) to the autocast dtype in force and runs the op with autocast off; the gradients flow
back through the casts to the float32 parameters, as for aten's layers. The gate runs in float32
(a softmax over prototype similarities, like aten's float32 ops under autocast).
torch.library.register_autocast fixes one dtype per device at registration; these kernels read
the dtype of the autocast region they run in.
"""
from __future__ import annotations

import torch

from . import areas, compact, fa, gate

LOWER_PRECISION = (fa.fa_linear, fa.fa_conv, fa.fa_matmul, fa.fa_einsum, fa.fa_grouped_mm,
                   areas.area_linear, areas.area_conv, compact.compact_linear)
FLOAT32 = (gate.region_gate,)
DEVICES = ("cpu", "cuda")


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = (value.is_floating_point() and value.device.type == device_type
                    and value.dtype is not torch.float64)
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _register(op, device_type: str, fixed_dtype) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    overload = op._opoverload

    def kernel(_, *args):
        dtype = fixed_dtype or torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return overload(*_cast(args, device_type, dtype))

    op._lib.impl(op._name, kernel, key, with_keyset=True)


for _device in DEVICES:
    if torch._C._is_autocast_available(_device):
        for _op in LOWER_PRECISION:
            _register(_op, _device, None)
        for _op in FLOAT32:
            _register(_op, _device, torch.float32)
