"""Checks at the host boundary: clear TypeError/ValueError before anything is launched or changed."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256


def _describe(name, t):
    return f"{name} {tuple(t.shape)} {t.dtype} on {t.device}"


def _base_operands(weight):
    """(name, tensor) of the base weight's tensors: those a description names, else W itself
    (checked to be a tensor with the other operands)."""
    named_tensors = getattr(weight, "named_tensors", None)
    return [("weight", weight)] if named_tensors is None else named_tensors()


def check_lora_linear_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Validate the operands of `lora_linear`. Raises TypeError (kind, dtype, device) or ValueError (shape, range).

    weight: a dense tensor, or a base-weight description (`operands`: a 4-bit base, say), whose own
    `check` says what it accepts.
    """
    if _valid_dense_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        return
    named = [("x", x), *_base_operands(weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        raise TypeError("all operands must be on one device; got "
                        + ", ".join(_describe(n, t) for n, t in named))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if isinstance(weight, torch.Tensor):
        check_dense_weight(x, weight, bias, named)
    else:
        weight.check(x, bias, named)
    check_adapter(x, tuple(weight.shape), lora_A, lora_B, named)
    for name, t in named:
        if t is not x and t.dim() >= 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension; got strides {t.stride()}")
    check_scalars(scaling, dropout_p)
    check_scaling_fits(scaling, lora_A.dtype, f"r = {lora_A.shape[0]}")


LARGEST_FINITE = {dtype: torch.finfo(dtype).max for dtype in FLOAT_DTYPES}  # per float dtype the kernels take


def _valid_dense_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """True when a call with a dense weight passes every check of `check_lora_linear_inputs` (the
    common case, in a few comparisons per call); False sends the call through those checks, which
    name what is wrong. Under torch.compile always False (the scalars are not checked there)."""
    tensor = torch.Tensor
    if not (isinstance(x, tensor) and isinstance(weight, tensor) and isinstance(lora_A, tensor)
            and isinstance(lora_B, tensor) and (bias is None or isinstance(bias, tensor))):
        return False
    dtype, device = x.dtype, x.device
    if (dtype not in FLOAT_DTYPES or weight.dtype != dtype or weight.device != device or lora_A.device != device
            or lora_B.device != device or x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2):
        return False
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if (x.shape[-1] != in_features or in_features == 0 or lora_A.shape[1] != in_features or not 1 <= r <= MAX_RANK
            or lora_B.shape != (out_features, r) or lora_B.dtype != lora_A.dtype
            or lora_A.dtype not in (dtype, torch.float32)
            or weight.stride(-1) != 1 or lora_A.stride(-1) != 1 or lora_B.stride(-1) != 1):
        return False
    if bias is not None and (bias.dtype != dtype or bias.device != device or bias.shape != (out_features,)
                             or bias.stride(-1) != 1):
        return False
    if type(scaling) not in (float, int) or type(dropout_p) not in (float, int) or torch.compiler.is_compiling():
        return False
    return math.isfinite(scaling) and abs(scaling) <= LARGEST_FINITE[lora_A.dtype] and 0.0 <= dropout_p < 1.0


def _check_x_matches(x, out_features, in_features, weight_text):
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (*, in_features); got shape {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must be in_features = {in_features} ({weight_text}); "
                         f"got x {tuple(x.shape)}")
    if in_features == 0:
        # nn.Linear allows it, but the adapter has no weights to learn (x A^T is identically zero).
        raise ValueError(f"in_features must be positive for a LoRA adapter; got x {tuple(x.shape)}, {weight_text}")


def _check_bias_shape(bias, out_features):
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be (out_features,) = ({out_features},); got {tuple(bias.shape)}")


def check_dense_weight(x, weight, bias, named):
    """The base-weight seam's checks for a dense W (`operands.DenseWeight`): dtype and shapes.

    `named`: every operand as (name, tensor), for messages that show them all.
    """
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError("weight and bias must have x's dtype; got "
                        + ", ".join(_describe(n, t) for n, t in named))
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features); got {tuple(weight.shape)}")
    _check_x_matches(x, *weight.shape, f"weight {tuple(weight.shape)}")
    _check_bias_shape(bias, weight.shape[0])


def check_four_bit_weight(x, weight, bias, named):
    """The base-weight seam's checks for a 4-bit W (`operands.FourBitWeight`, whose own constructor
    checks the codes, absmax and table against its shape): x is the compute dtype (fp32, fp16 or
    bf16, checked before), the bias has x's dtype, the shapes agree, the tensors are contiguous
    (the kernels read them at flat offsets) and the description carries no second bias.
    """
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must have x's dtype (the compute dtype of the 4-bit base); got "
                        f"{_describe('bias', bias)}, {_describe('x', x)}")
    if weight.bias is not None and weight.bias is not bias:
        raise ValueError("the FourBitWeight carries a bias of its own: pass the bias as lora_linear's bias argument "
                         f"and leave FourBitWeight.bias None (got {_describe('FourBitWeight.bias', weight.bias)})")
    text = f"4-bit weight {tuple(weight.shape)}"
    _check_x_matches(x, *weight.shape, text)
    _check_bias_shape(bias, weight.shape[0])
    for name, t in weight.named_tensors():
        if not t.is_contiguous():
            raise ValueError(f"{name} of the {text} must be contiguous; got shape {tuple(t.shape)}, "
                             f"strides {t.stride()}")


def check_adapter(x, features, lora_A, lora_B, named):
    """The adapter seam's checks for one adapter (`operands.Adapter`): dtypes, rank and shapes.

    features: the base's (out_features, in_features).
    """
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A and lora_B must share one dtype, x's ({x.dtype}) or float32; got "
                        f"{_describe('lora_A', lora_A)}, {_describe('lora_B', lora_B)}")
    out_features, in_features = features
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be (r, in_features) = (r, {in_features}); got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r = lora_A.shape[0] must be in [1, {MAX_RANK}]; got {r} (lora_A {tuple(lora_A.shape)})")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must be (out_features, r) = ({out_features}, {r}); got {tuple(lora_B.shape)}")


def check_scalars(scaling, dropout_p):
    # Under torch.compile a float argument is a graph input whose value is unknown while tracing
    # (checking it would break the graph): scalar values are checked in eager mode only.
    if torch.compiler.is_compiling():
        return
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite Python float; got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a Python float; got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def check_scaling_fits(scaling, dtype, detail):
    """ValueError when |scaling| exceeds the largest finite value of the adapters' `dtype`.

    Such a scaling is inf there, and the LoRA term becomes inf or NaN. `detail` says where the
    scaling comes from, for the message (e.g. "lora_alpha / r = 1e+06 / 1").
    """
    if torch.compiler.is_compiling() or not dtype.is_floating_point:
        return
    largest = torch.finfo(dtype).max
    if abs(scaling) > largest:
        raise ValueError(f"scaling = {scaling:g} ({detail}) is not finite in the adapters' dtype {dtype} "
                         f"(largest {largest:g}); choose a lora_alpha that keeps the scaling within that range")


def memory_span(t):
    """(device, first byte, end byte) of t's elements (torch strides are never negative), or None
    for a tensor without elements or that reports no address (meta, wrapper subclasses such as DTensor)."""
    first = t.data_ptr()
    if t.numel() == 0 or first == 0:
        return None
    return t.device, first, first + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def spans_overlap(a, b):
    """True when two `memory_span`s (None: no address) overlap on one device."""
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def shares_memory(a, b):
    """True when tensors a and b may write each other's elements: the same tensor, or overlapping
    memory (tied weights, views). Tensors without an address count by identity only."""
    return a is b or spans_overlap(memory_span(a), memory_span(b))


def check_lora_hyperparameters(in_features, out_features, r, lora_alpha, lora_dropout):
    for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {value!r}")
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"in_features and out_features must be positive; got ({in_features}, {out_features})")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"r must be in [1, {MAX_RANK}]; got {r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise TypeError(f"lora_alpha must be a finite number; got {lora_alpha!r}")
    check_scalars(1.0, lora_dropout)
