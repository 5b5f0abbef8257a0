"""Host function of the merge kernel: W +/- s * B @ A, in place or into a new tensor."""

import torch
import triton

from lorakernels.kernels.lora_merge import lora_merge_kernel
from lorakernels.ops import configs


def lora_merge(weight, lora_A, lora_B, scaling, subtract=False, out=None, backend="triton"):
    """out = weight + scaling * lora_B @ lora_A (or minus, with subtract), rounded once per element.

    Args:
        weight: [N, K] fp32/fp16/bf16. lora_A: [R, K], lora_B: [N, R]. All with a unit
        last-dim stride (LoRALinear's parameters are contiguous).
        out: where to write (may be `weight` itself, for an in-place merge); default a new tensor.
        backend: 'triton' (one tiled pass over W) or 'torch' (fp64 reference arithmetic).
    Returns:
        out.
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    if out is None:
        out = torch.empty_like(weight)
    if backend == "torch":
        delta = float(scaling) * (lora_B.double() @ lora_A.double())
        merged = weight.double() - delta if subtract else weight.double() + delta
        return out.copy_(merged.float().to(weight.dtype))
    if N and K:
        cfg = configs.merge_config()
        lora_merge_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))](
            weight, lora_B, lora_A, out, N, K, R, weight.stride(0), lora_B.stride(0), lora_A.stride(0), out.stride(0),
            float(scaling), SUBTRACT=subtract, **cfg)
    return out
