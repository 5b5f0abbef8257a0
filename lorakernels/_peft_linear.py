"""The fused route of PEFT's `lora.Linear`: a subclass that `lorakernels.patch_peft` swaps in.

Importing this module imports peft; `lorakernels.peft_patch` imports it only when a model is
patched, so peft stays an optional dependency.

`Linear` keeps PEFT's class name, attributes, parameters and every method but `forward`. Its
`forward` decides on every call whether `lora_linear` computes exactly what PEFT's
`lora.Linear.forward` would (`route`); if not, PEFT's own forward runs unchanged.
The conditions mirror peft's `tuners/lora/layer.py` (`Linear.forward`, checked against peft
0.21.2): adapters enabled and not merged, no variant keyword arguments, one active adapter of
this layer, vanilla LoRA (no `lora_variant`: DoRA, aLoRA, VeLoRA, KaSA, ...), no LoRA bias, no
`fan_in_fan_out`, a plain `nn.Linear` base with a frozen weight or a bitsandbytes `Linear4bit`
base (QLoRA: dtypes in `_four_bit_dtypes`), plain `nn.Linear` adapters, `nn.Dropout` or
`nn.Identity` dropout, a float scaling, no hooks that the fused call would skip, and operands
`lora_linear` accepts. `FusedRoute` is the forward itself, mixed into `Linear` here and into
`_peft_linear4bit.Linear4bit` (PEFT's QLoRA class).

Mixed batches (`adapter_names=`, which PEFT's model passes to every LoRA layer through a
forward pre-hook; `mixed_route`) run `lora_linear_segmented`, mirroring `_check_forward_args`
and `_mixed_batch_forward`: one name per entry of x's first dimension, adapters not merged, rows
named "__base__" or after an adapter this layer does not hold take the base layer alone, and
each adapter named that the layer holds meets the conditions above (vanilla LoRA, its modules,
dtypes), the adapters in one dtype, their ranks summing to at most 256. Every other case, DoRA
named in a batch included (PEFT raises there), runs PEFT's forward.

Dtypes, as PEFT: outside autocast the base layer runs in x's dtype (which must be the base
weight's) and the LoRA path in the adapters' dtype (x is cast to it: `_cast_input_dtype`);
`lora_linear` does the same with fp32 adapters under a 16-bit x, casting tiles rather than x.
Under torch.autocast PEFT's `lora_A(x)` runs in the autocast dtype; `lora_linear` keeps fp32
adapters in fp32 there (at least as accurate). The output has the base layer's dtype.
"""

from typing import NamedTuple, Optional

import torch
from peft.tuners.lora import layer as peft_lora_layer
from torch import nn

from lorakernels import four_bit
from lorakernels._validation import FLOAT_DTYPES, LARGEST_FINITE, MAX_RANK
from lorakernels.functional import lora_linear, lora_linear_segmented
from lorakernels.modules import BASE_ONLY
from lorakernels.operands import four_bit_shape_error

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
    """Why this call's arguments need PEFT's forward, or None (`adapter_names` is `mixed_route`'s)."""
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
    reason = adapter_reason(layer, name)
    return (name, None) if reason is None else (None, reason)


def adapter_reason(layer, name):
    """Why adapter `name` of the layer is not vanilla LoRA that `lora_linear` computes, or None."""
    if name in layer.lora_variant or layer.use_dora.get(name, False):
        return "LoRA variant (DoRA, aLoRA, ...)"
    if layer.lora_bias.get(name, False):
        return "LoRA bias (lora_bias=True)"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out"
    return None


class Operands(NamedTuple):
    """The modules and tensors of one adapter of a PEFT `lora.Linear`, read once per call."""

    base: nn.Module
    lora_A: nn.Module
    lora_B: nn.Module
    dropout: nn.Module
    scaling: object
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    A: torch.Tensor
    B: torch.Tensor
    four_bit: bool  # the base is a bitsandbytes Linear4bit (`is_four_bit_base`)

    @classmethod
    def of(cls, layer, name, four_bit_base):
        base, lora_A, lora_B = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
        return cls(base, lora_A, lora_B, layer.lora_dropout[name], layer.scaling[name],
                   getattr(base, "weight", None), getattr(base, "bias", None), getattr(lora_A, "weight", None),
                   getattr(lora_B, "weight", None), four_bit_base)


def is_four_bit_base(base):
    """Whether `base` is a bitsandbytes `Linear4bit` (or a subclass keeping its forward: LinearNF4,
    LinearFP4), whose forward the 4-bit route mirrors. bitsandbytes is looked up only where it has
    been imported (a 4-bit base can exist only then)."""
    bnb_nn = four_bit.loaded_bitsandbytes_nn()
    linear4bit = None if bnb_nn is None else bnb_nn.Linear4bit
    return linear4bit is not None and isinstance(base, linear4bit) and type(base).forward is linear4bit.forward


def _base_reason(base, weight, four_bit_base):
    """Why the base layer (and its weight) is not one the kernels read: a plain `nn.Linear` with
    a frozen weight (its tensor type and strides are `module_reason`'s, with the adapters'), or a
    bitsandbytes `Linear4bit` with quantized 4-bit codes. None if it is."""
    if type(base) is nn.Linear:
        if weight.requires_grad:
            return "base weight requires grad"
        return None if weight.shape[1] else "in_features == 0"
    if not four_bit_base:
        return f"base layer is {type(base).__name__}, not nn.Linear or bitsandbytes Linear4bit"
    if not four_bit.is_params4bit(weight) or weight.requires_grad:
        return "4-bit base weight is not a frozen bitsandbytes Params4bit"
    try:
        four_bit.check_quantized(weight)
    except ValueError:
        return "4-bit base weight not quantized, or in bitsandbytes' CPU-packed layout"
    shape = tuple(weight.quant_state.shape)
    if four_bit_shape_error(shape) or shape[1] == 0:
        return "4-bit base shape the kernels cannot read (odd in_features or 2**31 elements)"
    return None


def module_reason(ops):
    """Why these `Operands` (base layer, lora_A/B, dropout, scaling, weights) need PEFT's forward."""
    base, lora_A, lora_B, dropout, scaling, weight, bias, A, B, four_bit_base = ops
    reason = _base_reason(base, weight, four_bit_base)
    if reason is not None:
        return reason
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return "lora_A/lora_B are not plain bias-free nn.Linear"
    if type(dropout) is nn.Dropout:
        if not 0.0 <= dropout.p < 1.0 or dropout.inplace:
            return "dropout is not nn.Dropout(p < 1) or nn.Identity"
    elif type(dropout) is not nn.Identity:
        return "dropout is not nn.Dropout(p < 1) or nn.Identity"
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return f"scaling is a {type(scaling).__name__}, not a float"
    if _has_hooks(base) or _has_hooks(lora_A) or _has_hooks(lora_B) or _has_hooks(dropout) or _global_hooks():
        return "hooks on the base layer or the adapter modules"
    dense = () if four_bit_base else (weight,)
    for t in (*dense, A, B) if bias is None else (*dense, A, B, bias):
        if type(t) not in PLAIN_TENSOR_TYPES:
            return "a weight is a tensor subclass (DTensor, quantized, ...)"
        if t.stride(-1) != 1:
            return "a weight without a unit last-dim stride"
    if not 1 <= A.shape[0] <= MAX_RANK:
        return f"rank {A.shape[0]} outside 1..{MAX_RANK}"
    return None


def _autocast_dtypes(device_type, adapter_dtype):
    """Under a 16-bit autocast: (the autocast dtype, the adapters' compute dtype: fp32 adapters stay
    fp32, others take the autocast dtype); None under another autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    return dtype, adapter_dtype if adapter_dtype == torch.float32 else dtype


def _operand_dtypes(layer, x, device_type, weight, adapter_dtype, casts):
    """(compute dtype of x and the base, of the adapters), or None when PEFT would compute otherwise."""
    if torch.is_autocast_enabled(device_type):
        return _autocast_dtypes(device_type, adapter_dtype) if weight.dtype in FLOAT_DTYPES else None
    if weight.dtype != x.dtype:
        return None  # PEFT's base layer raises here: let it
    return _adapter_dtypes(layer, x.dtype, x.dtype, adapter_dtype, casts)


def _adapter_dtypes(layer, x_dtype, compute_dtype, adapter_dtype, casts=None):
    """(compute_dtype, adapter_dtype) when PEFT's LoRA path, outside autocast, computes in the
    adapters' dtype on x as `lora_linear` would on x cast to `compute_dtype`; else None.

    PEFT casts x to the adapters' dtype when they differ (`_cast_input_dtype`, unless disabled;
    casts=None reads that switch, True: a path that always casts, `lora.Linear`'s mixed batch);
    `lora_linear` takes adapters in x's dtype or fp32 and casts tiles instead.
    """
    if casts is None:
        casts = getattr(layer, "cast_input_dtype_enabled", True)
    if not (adapter_dtype == x_dtype or (adapter_dtype == torch.float32 and casts)):
        return None
    return (compute_dtype, adapter_dtype) if adapter_dtype in (compute_dtype, torch.float32) else None


def four_bit_compute_dtype(base, x_dtype):
    """The dtype bitsandbytes' `Linear4bit.forward` computes in for an x of `x_dtype`: its
    `compute_dtype`, which its first call sets to x's dtype when that is fp32 or bf16
    (`set_compute_type`); None keeps x's dtype."""
    compute = base.compute_dtype
    if not getattr(base, "compute_type_is_set", True) and x_dtype in (torch.float32, torch.bfloat16):
        compute = x_dtype
    return compute or x_dtype


def _four_bit_dtypes(layer, base, x, device_type, adapter_dtype, casts):
    """(compute dtype of x and the dequantized base, of the adapters) over a bitsandbytes 4-bit base,
    or None when PEFT would compute otherwise.

    bitsandbytes casts x to its compute dtype, multiplies by W dequantized (to the dtype W was
    quantized from, then cast to the compute dtype) and returns x's dtype. The kernels dequantize
    W's tiles straight to the compute dtype: the same where the two dtypes agree (QLoRA's usual
    bf16 / bf16), one rounding fewer where the compute dtype is wider.
    Under autocast bitsandbytes' matmul runs in the autocast dtype on x cast to the compute dtype
    first: routed when that first cast loses nothing (compute dtype = autocast dtype or fp32) and
    the output dtype is x's (x in the autocast dtype or fp32).
    """
    compute = four_bit_compute_dtype(base, x.dtype)
    if compute not in FLOAT_DTYPES:
        return None
    if torch.is_autocast_enabled(device_type):
        dtypes = _autocast_dtypes(device_type, adapter_dtype)
        if dtypes is None or compute not in (dtypes[0], torch.float32) or x.dtype not in (dtypes[0], torch.float32):
            return None
        return dtypes
    if not (x.dtype == compute or (compute == torch.float32 and x.dtype in FLOAT_DTYPES)):
        return None  # x narrowed to the compute dtype, which PEFT's LoRA path does not see
    return _adapter_dtypes(layer, x.dtype, compute, adapter_dtype, casts)


def in_features(ops):
    """The base layer's in_features, read off its weight (a 4-bit weight's from its quantization state)."""
    return ops.weight.quant_state.shape[1] if ops.four_bit else ops.weight.shape[1]


def input_reason(layer, ops, x, casts=None):
    """Why input `x` needs PEFT's forward with these `Operands`, or None. casts: see `_adapter_dtypes`."""
    if type(x) not in PLAIN_TENSOR_TYPES:
        return "input is not a plain tensor"
    device = x.device
    if device.type not in ("cpu", "cuda"):
        return f"input on {device.type} (fused on cpu and cuda)"
    weight, bias, A, B = ops.weight, ops.bias, ops.A, ops.B
    if weight.device != device or A.device != device or B.device != device:
        return "operands on several devices"
    if x.dim() < 1 or x.shape[-1] != in_features(ops) or x.dtype not in FLOAT_DTYPES:
        return "input shape or dtype"
    four_bit_base = ops.four_bit
    # A dense base's bias has its weight's dtype; a 4-bit base's is cast to the compute dtype.
    bias_dtypes = FLOAT_DTYPES if four_bit_base else (weight.dtype,)
    if A.dtype != B.dtype or (bias is not None and bias.dtype not in bias_dtypes):
        return "lora_A/lora_B (or weight/bias) dtypes differ"
    if four_bit_base:
        dtypes = _four_bit_dtypes(layer, ops.base, x, device.type, A.dtype, casts)
    else:
        dtypes = _operand_dtypes(layer, x, device.type, weight, A.dtype, casts)
    if dtypes is None:
        base_dtype = f"4-bit base computing in {ops.base.compute_dtype}" if four_bit_base else f"base {weight.dtype}"
        return (f"dtypes: x {x.dtype}, {base_dtype}, adapters {A.dtype}"
                + (" (autocast)" if torch.is_autocast_enabled(device.type) else ""))
    if abs(ops.scaling) > LARGEST_FINITE[dtypes[1]]:
        return f"scaling not finite in {dtypes[1]}"
    return None


def layer_state(layer):
    """(`Operands` of the active adapter, None) when the layer's state lets `lora_linear` compute its
    forward exactly (the call's own arguments aside); else (None, why not)."""
    name, reason = active_adapter(layer)
    if reason is not None:
        return None, reason
    ops = Operands.of(layer, name, _four_bit_base(layer))
    reason = module_reason(ops)
    return (ops, None) if reason is None else (None, reason)


def _four_bit_base(layer):
    """`is_four_bit_base` of the layer's base; over a 4-bit base, first what bitsandbytes' forward does
    first: a weight whose QuantState was lost (FSDP) gets the module's back."""
    four_bit_base = is_four_bit_base(layer.base_layer)
    if four_bit_base:
        four_bit.bitsandbytes_modules().fix_4bit_weight_quant_state_from_module(layer.base_layer)
    return four_bit_base


class MixedOperands(NamedTuple):
    """The operands of one mixed-batch call (`adapter_names`) of a PEFT `lora.Linear`: the
    `Operands` of each adapter with rows (of the layer's first adapter, taking no rows, where none
    has any: the fused call needs one), the adapter index of each entry of x's first dimension
    (-1: the base alone), and the base's fields that the fused forward reads, as `Operands` has them."""

    adapters: tuple
    rows: list
    base: nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    four_bit: bool


def mixed_route(layer, x, adapter_names, casts):
    """(`MixedOperands`, None) when `lora_linear_segmented` computes exactly what PEFT's
    `lora.Linear.forward(x, adapter_names=...)` does; else (None, why not). casts: see `_adapter_dtypes`."""
    if layer.disable_adapters:
        return None, "adapters disabled"
    if layer.merged:
        return None, "adapter merged"  # PEFT raises: adapter_names with merged adapters
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        return None, "adapter_names is not a list of str"
    if type(x) not in PLAIN_TENSOR_TYPES or x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return None, "adapter_names is not one name per entry of x's first dimension"  # PEFT raises, or indexes a 1-D x
    held = layer.lora_A.keys()
    used = [n for n in dict.fromkeys(adapter_names) if n != BASE_ONLY and n in held]
    for name in used:
        reason = adapter_reason(layer, name)
        if reason is not None:
            return None, reason
    names = used or list(held)[:1]
    if not names:
        return None, "no adapter on this layer"
    four_bit_base = _four_bit_base(layer)
    adapters = tuple(Operands.of(layer, name, four_bit_base) for name in names)
    for ops in adapters:
        reason = module_reason(ops) or input_reason(layer, ops, x, casts)
        if reason is not None:
            return None, reason
    if len({ops.A.dtype for ops in adapters}) > 1:
        return None, "adapters of different dtypes in one batch"
    if sum(ops.A.shape[0] for ops in adapters) > MAX_RANK:
        return None, f"ranks of the adapters in one batch sum above {MAX_RANK}"
    position = {name: i for i, name in enumerate(used)}
    first = adapters[0]
    return MixedOperands(adapters, [position.get(n, -1) for n in adapter_names], first.base, first.weight,
                         first.bias, first.four_bit), None


ROUTE_CACHE_ATTR = "_lorakernels_route"


def state_witness(layer):
    """Everything `layer_state`'s answer depends on, over a plain (not 4-bit) base, read without
    judging it: the layer's adapter switches, active adapter and adapter names; the identity,
    class and hooks of the modules of the one active adapter (base layer, lora_A, lora_B,
    dropout), its scaling, variant flags and dropout settings; the identity, class, requires_grad,
    last stride and shape of their tensors; and whether any global hook is set. None where the
    answer is not cached (several or no active adapters, a 4-bit base, a missing weight:
    `layer_state` decides each call). Equal witnesses, equal answers: a fused answer holds the
    witnessed objects, so their identities cannot be reused while it is cached, and a fallback
    answer depends on the witnessed properties alone."""
    modules = layer._modules
    base, lora_A, lora_B, dropout = (modules["base_layer"], modules["lora_A"]._modules, modules["lora_B"]._modules,
                                     modules["lora_dropout"]._modules)
    names = [a for a in layer.active_adapters if a in lora_A]
    if len(names) != 1 or type(base) is not nn.Linear:
        return None
    name = names[0]
    a, b, drop = lora_A[name], lora_B.get(name), dropout.get(name)
    if b is None or drop is None:
        return None
    weight, bias = base._parameters.get("weight"), base._parameters.get("bias")
    A, B = a._parameters.get("weight"), b._parameters.get("weight")
    if weight is None or A is None or B is None or "bias" in base.__dict__ or "bias" in b.__dict__:
        return None  # a tensor outside `_parameters` (deleted, then set as a plain attribute): not witnessed
    scaling = layer.scaling.get(name)
    return (layer.disable_adapters, tuple(layer.merged_adapters), name, tuple(lora_A), layer.fan_in_fan_out,
            name in layer.lora_variant, layer.use_dora.get(name, False), layer.lora_bias.get(name, False),
            type(scaling), scaling, id(base), id(a), id(b), id(drop), type(base), type(a), type(b), type(drop),
            _has_hooks(base) or _has_hooks(a) or _has_hooks(b) or _has_hooks(drop) or _global_hooks(),
            drop.__dict__.get("p"), drop.__dict__.get("inplace"), id(weight), id(bias), id(A), id(B),
            weight.requires_grad, weight.shape[1], A.shape[0], b._parameters.get("bias") is None,
            type(weight), weight.stride(-1), type(A), A.stride(-1), type(B), B.stride(-1),
            None if bias is None else (type(bias), bias.stride(-1)))


def cached_layer_state(layer):
    """`layer_state(layer)`, recomputed only when the layer's `state_witness` changes (a new active
    adapter, merge, disable, a hook, a module or weight swapped, a frozen weight unfrozen, ...);
    per call the witness is read and compared, not judged. Under torch.compile, `layer_state` (the
    graph is specialized on the layer's state there)."""
    witness = None if torch.compiler.is_compiling() else state_witness(layer)
    if witness is None:
        return layer_state(layer)
    cached = layer.__dict__.get(ROUTE_CACHE_ATTR)
    if cached is not None and cached[0] == witness:
        return cached[1]
    state = layer_state(layer)
    layer.__dict__[ROUTE_CACHE_ATTR] = (witness, state)
    return state


def route(layer, x, args, kwargs, mixed_casts=None):
    """(`Operands` of the active adapter, or `MixedOperands` of an `adapter_names` call, None) when
    `lora_linear` (or `lora_linear_segmented`) computes this call of PEFT's `lora.Linear.forward`
    exactly; else (None, why not). mixed_casts: how the layer's mixed batch casts x (`_adapter_dtypes`)."""
    reason = call_reason(args, kwargs)
    if reason is not None:
        return None, reason
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is not None:
        return mixed_route(layer, x, adapter_names, mixed_casts)
    ops, reason = cached_layer_state(layer)
    reason = reason or input_reason(layer, ops, x)
    return (ops, None) if reason is None else (None, reason)


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


class FusedRoute:
    """The forward of the fused PEFT layer classes (mixed in before PEFT's class): `lora_linear`
    (`lora_linear_segmented` for `adapter_names`) when `route` says it computes this call exactly,
    PEFT's own forward otherwise."""

    def forward(self, x, *args, **kwargs):
        # How PEFT's `_mixed_batch_forward` casts x to the adapters' dtype: `lora.Linear`'s always does
        # (`x[rows].to(lora_A.weight.dtype)`); `lora.bnb.Linear4bit`'s follows `_cast_input_dtype` (None).
        ops, reason = route(self, x, args, kwargs, True if isinstance(self, PeftLinear) else None)
        count_call(self, reason or FUSED)
        if reason is not None:
            return super().forward(x, *args, **kwargs)
        if ops.four_bit:
            return self._fused_four_bit_forward(x, ops)
        return self._fused_forward(x, ops, ops.weight, ops.bias)

    def _fused_forward(self, x, ops, weight, bias):
        options = getattr(self, "_lorakernels_options", None) or {}
        if type(ops) is MixedOperands:
            # Each adapter's own dropout module decides, as in PEFT's loop (rate 0 where it is in eval mode).
            return lora_linear_segmented(x, weight, bias, [(o.A, o.B, float(o.scaling)) for o in ops.adapters],
                                         ops.rows, [_dropout_p(o.dropout) for o in ops.adapters], True,
                                         backend=options.get("backend"), base_gemm=options.get("base_gemm"))
        p = float(ops.dropout.p) if type(ops.dropout) is nn.Dropout else 0.0
        return lora_linear(x, weight, bias, ops.A, ops.B, float(ops.scaling), dropout_p=p,
                           training=ops.dropout.training, backend=options.get("backend"),
                           base_gemm=options.get("base_gemm"))

    def _fused_four_bit_forward(self, x, ops):
        # bitsandbytes' `Linear4bit.forward` settles its compute dtype on its first call and casts
        # its bias to it in place: the same state changes, then its arithmetic on the packed weight.
        base = ops.base
        if not getattr(base, "compute_type_is_set", True):
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute = base.compute_dtype or x.dtype
        bias = ops.bias
        if bias is not None and bias.dtype != compute:
            bias.data = bias.data.to(compute)
        weight = four_bit.four_bit_weight(ops.weight)
        x_compute = x if torch.is_autocast_enabled(x.device.type) else x.to(compute)
        return self._fused_forward(x_compute, ops, weight, bias).to(x.dtype)


def _dropout_p(dropout):
    return float(dropout.p) if type(dropout) is nn.Dropout and dropout.training else 0.0


class Linear(FusedRoute, PeftLinear):
    """PEFT's `lora.Linear` whose forward runs `lorakernels.lora_linear` when that is exact.

    Same name, state, parameters and methods as PEFT's class (it is swapped in by setting
    `__class__`, so no parameter is copied or re-registered); `unpatch_peft` swaps PEFT's back.
    Its base is an `nn.Linear`, or a bitsandbytes `Linear4bit` where PEFT was not told the model
    is 4-bit (same forward as `lora.bnb.Linear4bit` up to a clone).
    """

    peft_class = PeftLinear
