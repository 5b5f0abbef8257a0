"""Plain-PyTorch reference of the LoRA linear: the single source of truth for tests and benchmarks.

Written as PEFT writes it (dropout, A, B, scale, add) and differentiable by autograd.
It never changes to match a kernel.
"""

import torch
import torch.nn.functional as F


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, keep_mask=None, dropout_p=0.0, upcast=False):
    """y = x W^T + b + scaling * ((x * keep / (1 - p)) A^T) B^T.

    Args:
        x: [*, K]. weight: [N, K]. bias: [N] or None. lora_A: [R, K]. lora_B: [N, R].
        keep_mask: boolean [*, K] (or [M, K] for the flattened x), True = kept; None = no dropout.
        dropout_p: p, used with keep_mask.
        upcast: compute everything in float64 (the accuracy reference); otherwise the LoRA
            path runs in the adapters' dtype and the base in x's dtype, as PEFT does.
    Returns:
        y: [*, N], float64 if upcast else x's dtype.
    """
    out_dtype = torch.float64 if upcast else x.dtype
    if upcast:
        x, weight, lora_A, lora_B = x.double(), weight.double(), lora_A.double(), lora_B.double()
        bias = bias.double() if bias is not None else None
    xd = x
    if keep_mask is not None:
        xd = x * keep_mask.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)
    base = F.linear(x, weight, bias)
    lora = F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B) * scaling
    return (base + lora.to(base.dtype)).to(out_dtype)
