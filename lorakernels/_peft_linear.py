"""The fused route of PEFT's `lora.Linear`: a subclass that `lorakernels.patch_peft` swaps in.

Importing this module imports peft; `lorakernels.peft_patch` imports it only when a model is
patched, so peft stays an optional dependency.

`Linear` keeps PEFT's class name, attributes, parameters and every method but `forward`. Its
`forward` decides on every call whether `lora_linear` computes exactly what PEFT's
`lora.Linear.forward` would (`route`); if not, PEFT's own forward runs unchanged.
The conditions mirror peft's `tuners/lora/layer.py` (`Linear.forward`, checked against peft
0.21.2): adapters enabled and not merged, no `adapter_names` (mixed batch) or variant
keyword arguments, one active adapter of this layer, vanilla LoRA (no `lora_variant`: DoRA,
aLoRA, VeLoRA, KaSA, ...), no LoRA bias, no `fan_in_fan_out`, a plain `nn.Linear` base with a
frozen weight, plain `nn.Linear` adapters, `nn.Dropout` or `nn.Identity` dropout, a float
scaling, no hooks that the fused call would skip, and operands `lora_linear` accepts.

Dtypes, as PEFT: outside autocast the base layer runs in x's dtype (which must be the base
weight's) and the LoRA path in the adapters' dtype (x is cast to it: `_cast_input_dtype`);
`lora_linear` does the same with fp32 adapters under a 16-bit x, casting tiles rather than x.
Under torch.autocast PEFT's `lora_A(x)` runs in the autocast dtype; `lora_linear` keeps fp32
adapters in fp32 there (at least as accurate). The output has the base layer's dtype.
"""

import torch
from peft.tuners.lora import layer as peft_lora_layer
from torch import nn

from lorakernels._validation import FLOAT_DTYPES, MAX_RANK
from lorakernels.functional import lora_linear

PeftLinear = peft_lora_layer.Linear
# Keyword arguments PEFT's forward pops for LoRA variants (aLoRA's offsets).
VARIANT_KWARG_KEYS = tuple(getattr(peft_lora_layer, "VARIANT_KWARG_KEYS", ("alora_offsets",)))
PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)

FUSED = "fused"


def _has_hooks(module):
    """True when calling `module` would run hooks (or an instance-level forward, as accelerate's
    offload hooks install) that a fused call, which reads its parameters directly, would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _global_hooks():
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def call_reason(args, kwargs):
    """Why this call's arguments need PEFT's forward, or None."""
    if kwargs.get("adapter_names") is not None:
        return "adapter_names (mixed-batch inference)"
    if any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS):
        return "LoRA-variant keyword arguments"
    if args or any(k not in ("adapter_names", *VARIANT_KWARG_KEYS) for k in kwargs):
        return "extra forward arguments"
    return None


def active_adapter(layer):
    """(name of the one active adapter this layer holds, None) or (None, why not)."""
    if layer.disable_adapters:
        return None, "adapters disabled"
    if layer.merged:
        return None, "adapter merged"
    names = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    if len(names) != 1:
        return None, "no active adapter on this layer" if not names else "several active adapters"
    name = names[0]
    if name in layer.lora_variant or layer.use_dora.get(name, False):
        return None, "LoRA variant (DoRA, aLoRA, ...)"
    if layer.lora_bias.get(name, False):
        return None, "LoRA bias (lora_bias=True)"
    if layer.fan_in_fan_out:
        return None, "fan_in_fan_out"
    return name, None


def module_reason(layer, name):
    """Why the modules of adapter `name` (base layer, lora_A/B, dropout, scaling) need PEFT's forward."""
    base, lora_A, lora_B = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return "lora_A/lora_B are not plain bias-free nn.Linear"
    if type(dropout) not in (nn.Dropout, nn.Identity) or (type(dropout) is nn.Dropout and not
                                                         (0.0 <= dropout.p < 1.0 and not dropout.inplace)):
        return "dropout is not nn.Dropout(p < 1) or nn.Identity"
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return f"scaling is a {type(scaling).__name__}, not a float"
    if any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout)) or _global_hooks():
        return "hooks on the base layer or the adapter modules"
    weight, bias = base.weight, base.bias
    tensors = (weight, lora_A.weight, lora_B.weight) + ((bias,) if bias is not None else ())
    if any(type(t) not in PLAIN_TENSOR_TYPES for t in tensors):
        return "a weight is a tensor subclass (DTensor, quantized, ...)"
    if weight.requires_grad:
        return "base weight requires grad"
    if not (1 <= lora_A.weight.shape[0] <= MAX_RANK) or weight.shape[1] == 0:
        return f"rank {lora_A.weight.shape[0]} outside 1..{MAX_RANK} or in_features == 0"
    if any(t.stride(-1) != 1 for t in tensors):
        return "a weight without a unit last-dim stride"
    return None


def _operand_dtypes(layer, x, weight, adapter_dtype):
    """(compute dtype of x and the base, of the adapters), or None when PEFT would compute otherwise."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype not in (torch.float16, torch.bfloat16) or weight.dtype not in FLOAT_DTYPES:
            return None
        return dtype, adapter_dtype if adapter_dtype == torch.float32 else dtype
    if weight.dtype != x.dtype:
        return None  # PEFT's base layer raises here: let it
    casts = getattr(layer, "cast_input_dtype_enabled", True)
    if adapter_dtype == x.dtype or (adapter_dtype == torch.float32 and casts):
        return x.dtype, adapter_dtype
    return None


def input_reason(layer, name, x):
    """Why input `x` needs PEFT's forward for adapter `name`, or None."""
    base, lora_A, lora_B = layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight
    if not isinstance(x, torch.Tensor) or type(x) not in PLAIN_TENSOR_TYPES:
        return "input is not a plain tensor"
    if x.device.type not in ("cpu", "cuda"):
        return f"input on {x.device.type} (fused on cpu and cuda)"
    if any(t.device != x.device for t in (base.weight, lora_A, lora_B)):
        return "operands on several devices"
    if x.dim() < 1 or x.shape[-1] != base.weight.shape[1] or x.dtype not in FLOAT_DTYPES:
        return "input shape or dtype"
    bias = base.bias
    if lora_A.dtype != lora_B.dtype or (bias is not None and bias.dtype != base.weight.dtype):
        return "lora_A/lora_B (or weight/bias) dtypes differ"
    dtypes = _operand_dtypes(layer, x, base.weight, lora_A.dtype)
    if dtypes is None:
        return (f"dtypes: x {x.dtype}, base {base.weight.dtype}, adapters {lora_A.dtype}"
                + (" (autocast)" if torch.is_autocast_enabled(x.device.type) else ""))
    if abs(layer.scaling[name]) > torch.finfo(dtypes[1]).max:
        return f"scaling not finite in {dtypes[1]}"
    return None


def route(layer, x, args, kwargs):
    """(adapter name, None) when `lora_linear` computes this call of PEFT's `lora.Linear.forward`
    exactly; else (None, why not)."""
    reason = call_reason(args, kwargs)
    if reason is not None:
        return None, reason
    name, reason = active_adapter(layer)
    if reason is None:
        reason = module_reason(layer, name) or input_reason(layer, name, x)
    return (name, None) if reason is None else (None, reason)


def count_call(layer, outcome):
    """Count one call's outcome (FUSED or a fallback reason) in eager mode.

    Under torch.compile nothing is counted: a counter read inside the graph would be guarded on
    and recompile every call.
    """
    if torch.compiler.is_compiling():
        return
    calls = getattr(layer, "_lorakernels_calls", None)
    if calls is not None:
        calls[outcome] = calls.get(outcome, 0) + 1


class Linear(PeftLinear):
    """PEFT's `lora.Linear` whose forward runs `lorakernels.lora_linear` when that is exact.

    Same name, state, parameters and methods as PEFT's class (it is swapped in by setting
    `__class__`, so no parameter is copied or re-registered); `unpatch_peft` swaps PEFT's back.
    """

    peft_class = PeftLinear

    def forward(self, x, *args, **kwargs):
        name, reason = route(self, x, args, kwargs)
        count_call(self, reason or FUSED)
        if reason is not None:
            return super().forward(x, *args, **kwargs)
        return self._fused_forward(x, name)

    def _fused_forward(self, x, name):
        base, dropout = self.base_layer, self.lora_dropout[name]
        options = getattr(self, "_lorakernels_options", None) or {}
        p = float(dropout.p) if type(dropout) is nn.Dropout else 0.0
        return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           float(self.scaling[name]), dropout_p=p, training=dropout.training,
                           backend=options.get("backend"), base_gemm=options.get("base_gemm"))
