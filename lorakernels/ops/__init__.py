"""Host functions (layer 2): validate-free launchers for 2-D inputs, one module per backend.

`lora_forward` / `lora_backward` are the entry points of the autograd layer: they take the
operand descriptions of `lorakernels.operands` and a `lorakernels.plan.LaunchPlan`, and run
the plan's backend.
"""

from lorakernels.ops import lora_linear as _triton_backend
from lorakernels.ops import lora_linear_torch as _torch_backend
from lorakernels.ops.lora_linear import base_gemm_forward, base_gemm_grad_x, dropout_keep_mask
from lorakernels.ops.lora_linear_torch import torch_keep_mask
from lorakernels.ops.lora_merge import lora_merge
from lorakernels.operands import GradsNeeded
from lorakernels.plan import Backend

_BACKENDS = {Backend.TRITON: _triton_backend, Backend.TORCH: _torch_backend}


def lora_forward(x, base, adapter, plan):
    """(y [M, N] in x's dtype, u [M, R] fp32) for 2-D x [M, K] with a unit last-dim stride.

    base: a `DenseWeight`; adapter: an `Adapter`; plan: a `LaunchPlan` (backend, base GEMM, precision).
    """
    return _BACKENDS[plan.backend].lora_forward(x, base, adapter, plan)


def lora_backward(dy, x, u, base, adapter, plan, needs=GradsNeeded()):
    """(dx [M, K], dA [R, K], dB [N, R]), None for a gradient `needs` does not ask for.

    dy: [M, N] with a unit last-dim stride; x and u as saved by `lora_forward` (x may be None
    unless needs.da, u unless needs.db).
    """
    return _BACKENDS[plan.backend].lora_backward(dy, x, u, base, adapter, plan, needs)


__all__ = [
    "base_gemm_forward",
    "base_gemm_grad_x",
    "dropout_keep_mask",
    "lora_backward",
    "lora_forward",
    "lora_merge",
    "torch_keep_mask",
]
