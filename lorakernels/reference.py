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


def lora_linear_segmented_ref(x, weight, bias, adapters, row_adapter, keep_mask=None, dropout_p=0.0, upcast=False):
    """Several adapters in one batch, one adapter per row, computed adapter by adapter:
    y[m] = x[m] W^T + b + s_a ((x[m] * keep[m] / (1 - p)) A_a^T) B_a^T with a = row_adapter[m]
    (-1: the base alone).

    Args:
        x: [*, K]. weight, bias, keep_mask, dropout_p, upcast: as `lora_linear_ref`.
        adapters: sequence of (lora_A [R_a, K], lora_B [N, R_a], scaling_a).
        row_adapter: integer tensor with one entry per row of x (x.shape[:-1] elements).
    Returns:
        y: [*, N], float64 if upcast else x's dtype; differentiable in every operand.
    """
    out_dtype = torch.float64 if upcast else x.dtype
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    rows = rows.double() if upcast else rows
    dropped = rows
    if keep_mask is not None:
        dropped = rows * keep_mask.reshape(rows.shape).to(rows.dtype) / (1.0 - dropout_p)
    w, b = (weight.double(), bias.double() if bias is not None else None) if upcast else (weight, bias)
    out = F.linear(rows, w, b)
    index = row_adapter.reshape(-1).to(rows.device)
    for a, (lora_A, lora_B, scaling) in enumerate(adapters):
        selected = (index == a).nonzero().squeeze(1)
        if selected.numel() == 0:
            continue
        A, B = (lora_A.double(), lora_B.double()) if upcast else (lora_A, lora_B)
        lora = F.linear(F.linear(dropped.index_select(0, selected).to(A.dtype), A), B) * scaling
        out = out.index_add(0, selected, lora.to(out.dtype))
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(out_dtype)
