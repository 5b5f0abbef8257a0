"""bitsandbytes' 4-bit layers (QLoRA) read as `operands.FourBitWeight`: the base-weight description
the kernels dequantize in registers.

bitsandbytes is optional: nothing here imports it. A `Params4bit` or a `Linear4bit` can only exist
once bitsandbytes was imported, so the type checks look for it among the loaded modules.

The description shares the packed codes and the quantization state's tensors (no copy). Its
absmax is the state's fp32 scales, or, under double quantization (bitsandbytes' default,
`compress_statistics=True`), None with the 8-bit scales kept compressed (`operands.NestedScales`):
each kernel launch expands them to fp32 for its duration, and autograd keeps the compressed form
(1 byte per block of `blocksize` weights plus ~1 KiB), never the expanded scales nor a dense W.
"""

import sys

import torch

from lorakernels.operands import FourBitWeight


def loaded_bitsandbytes_nn():
    """bitsandbytes.nn when bitsandbytes has been imported, else None."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes.nn

    return bitsandbytes.nn


def bitsandbytes_modules():
    """bitsandbytes.nn.modules (where `Linear4bit` and its helpers live); bitsandbytes must be imported."""
    import bitsandbytes.nn.modules

    return bitsandbytes.nn.modules


def is_params4bit(t):
    """Whether `t` is a bitsandbytes `Params4bit` (a 4-bit weight)."""
    bnb_nn = loaded_bitsandbytes_nn()
    return bnb_nn is not None and isinstance(t, bnb_nn.Params4bit)


def is_linear4bit(module):
    """Whether `module` is a bitsandbytes `Linear4bit` (an nn.Linear subclass with a 4-bit weight)."""
    bnb_nn = loaded_bitsandbytes_nn()
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def check_quantized(params, name="weight"):
    """ValueError unless the Params4bit `params` holds quantized codes the kernels can read."""
    state = getattr(params, "quant_state", None)
    if not getattr(params, "bnb_quantized", False) or state is None:
        raise ValueError(f"{name} is a bitsandbytes Params4bit that is not quantized yet ({tuple(params.shape)} "
                         f"{params.dtype} on {params.device}): bitsandbytes quantizes it when it is moved to its "
                         f"device (`linear4bit.to(device)`); do that first")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"{name} is in bitsandbytes' CPU-packed layout (Linear4bit.forward converts its weight in "
                         f"place on CPUs with AVX512-BF16 in eval mode without gradients), which is not the 4-bit "
                         f"format; rebuild the layer, or adapt it before running it that way")


def four_bit_weight(params, bias=None, name="weight"):
    """The `FourBitWeight` of a quantized bitsandbytes `Params4bit` (its codes shared, not copied).

    Args:
        params: a Params4bit after quantization, any `quant_storage` (its bytes are the codes),
            NF4 or FP4, with or without double quantization.
        bias: [out_features] or None, stored in the description.
    Raises:
        ValueError: not quantized yet, or in bitsandbytes' CPU-packed layout (see `check_quantized`),
            or a shape the 4-bit kernels cannot take (odd in_features, 2**31 elements or more).
    """
    check_quantized(params, name)
    data = params.data
    codes = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    return FourBitWeight.from_bitsandbytes(codes, params.quant_state, bias)


def storage_bytes(params):
    """Bytes a quantized Params4bit holds: its packed codes and its quantization state (block
    scales, code table and, under double quantization, the scales' own scales, table and offset)."""
    state = params.quant_state
    tensors = [params.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def original_dtype(params):
    """The dtype a Params4bit was quantized from (its quantization state records it)."""
    return params.quant_state.dtype
