"""Host functions (layer 2): validate-free launchers for 2-D inputs, one module per backend."""

from lorakernels.ops.lora_linear import (
    base_gemm_forward,
    base_gemm_grad_x,
    dropout_keep_mask,
    lora_backward,
    lora_forward,
)
from lorakernels.ops.lora_merge import lora_merge
from lorakernels.ops.lora_linear_torch import lora_backward_torch, lora_forward_torch, torch_keep_mask

__all__ = [
    "base_gemm_forward",
    "base_gemm_grad_x",
    "dropout_keep_mask",
    "lora_backward",
    "lora_backward_torch",
    "lora_forward",
    "lora_forward_torch",
    "lora_merge",
    "torch_keep_mask",
]
