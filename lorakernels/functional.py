"""`lora_linear` (layer 4): the functional form of the fused LoRA linear.

It settles the operands (autocast, validation), resolves the `LaunchPlan` once, flattens x to
rows and hands them to the autograd layer (`lorakernels.autograd`): the custom ops under
torch.compile, the eager autograd.Function otherwise.
"""

import torch

from lorakernels._validation import check_lora_linear_inputs
from lorakernels.autograd import BaseOpArgs, EagerLoRALinear, draw_seed, lora_linear_forward_op, pack_scalars
from lorakernels.four_bit import four_bit_weight, is_params4bit
from lorakernels.operands import FourBitWeight
from lorakernels.plan import resolve_plan
from lorakernels.reference import lora_linear_ref


def _as_rows(t):
    """2-D [M, features] view (a copy only if no view exists) with a unit last-dim stride."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


def _autocast_operands(x, weight, bias, lora_A, lora_B):
    """Under torch.autocast, compute as nn.Linear would: x, weight and bias in the autocast dtype.

    fp32 adapters stay fp32 (the kernels cast their tiles); adapters in another dtype follow
    the autocast dtype. The output then has the autocast dtype. A 4-bit weight stays as it is:
    the autocast dtype becomes its compute dtype.
    """
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return x, weight, bias, lora_A, lora_B  # not a float input: left for validation to reject
    x, bias = (t.to(dtype) if t is not None else None for t in (x, bias))
    if isinstance(weight, torch.Tensor):
        weight = weight.to(dtype)
    adapters = [a if a.dtype == torch.float32 else a.to(dtype) for a in (lora_A, lora_B)]
    return (x, weight, bias, *adapters)


def _base_description(weight):
    """A dense weight as it is; a bitsandbytes Params4bit as its `FourBitWeight` (codes shared)."""
    return four_bit_weight(weight) if is_params4bit(weight) else weight


def _check_frozen(weight):
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear keeps the base weight frozen; got weight.requires_grad=True "
                         f"(weight {tuple(weight.shape)}). Call weight.requires_grad_(False).")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None, base_gemm=None):
    """Fused LoRA linear: y = x W^T + b + scaling * dropout(x) A^T B^T.

    Args:
        x: [*, in_features], in_features >= 1, fp32/fp16/bf16, any strides. On the meta device
            (all operands) only shapes and dtypes are computed, with autograd, as by nn.Linear.
        weight: [out_features, in_features], frozen, x's dtype. Or a 4-bit base (QLoRA): an
            `operands.FourBitWeight` (its own bias None), or a quantized bitsandbytes `Params4bit`
            (read into one at each call, double-quantized scales expanded then); x's dtype is
            then the compute dtype, fp32/fp16/bf16, and the kernels dequantize W's tiles in
            registers (the torch backend dequantizes W for the call).
        bias: [out_features] or None, x's dtype.
        lora_A: [r, in_features]; lora_B: [out_features, r]; x's dtype or fp32.
        scaling: lora_alpha / r (or lora_alpha / sqrt(r) for rsLoRA), finite in the adapters' dtype.
        dropout_p: dropout on the input of A, in [0, 1). training: False disables dropout.
        backend: 'auto' | 'triton' | 'torch' or a `plan.Backend` (default: env LORAKERNELS_BACKEND, else 'auto').
        base_gemm: 'triton' | 'cublas' or a `plan.BaseGemm` (default: env LORAKERNELS_BASE_GEMM, else 'triton').
    Returns:
        y: [*, out_features] in x's dtype.
    """
    weight = _base_description(weight)
    if isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, lora_A, lora_B = _autocast_operands(x, weight, bias, lora_A, lora_B)
    check_lora_linear_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    _check_frozen(weight)
    if x.is_meta:
        # Meta tensors (models built under `torch.device("meta")` before their weights are
        # loaded) carry shapes and dtypes only: the plain composition propagates them, and
        # autograd's, as nn.Linear's does. Backend choices are checked as for a CUDA model.
        resolve_plan(torch.device("cuda"), backend, base_gemm)
        dense = x.new_empty(weight.shape) if isinstance(weight, FourBitWeight) else weight
        return lora_linear_ref(x, dense, bias, lora_A, lora_B, scaling)
    plan = resolve_plan(x.device, backend, base_gemm)
    p = dropout_p if training else 0.0
    scalars = pack_scalars(draw_seed() if p > 0 else 0, scaling, p)
    rows = _as_rows(x)
    base = BaseOpArgs.of(weight)
    if torch.compiler.is_compiling():
        y, _ = lora_linear_forward_op(rows, base.weight, bias, lora_A, lora_B, scalars, *plan.to_op_args(),
                                      *base[1:])
    else:
        y = EagerLoRALinear.apply(rows, base.weight, bias, lora_A, lora_B, scalars, plan, *base[1:])
    return y.view(*x.shape[:-1], base.shape[0])
