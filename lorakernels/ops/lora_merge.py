"""Host function of the merge kernel: W +/- s * B @ A, in place or into a new tensor."""

import torch

from lorakernels.ops import configs, specs
from lorakernels.plan import Backend


def lora_merge(weight, lora_A, lora_B, scaling, subtract=False, out=None, backend=Backend.TRITON):
    """out = weight + scaling * lora_B @ lora_A (or minus, with subtract), rounded once per element.

    Args:
        weight: [N, K] fp32/fp16/bf16. lora_A: [R, K], lora_B: [N, R]. All with a unit
        last-dim stride (LoRALinear's parameters are contiguous).
        out: where to write (may be `weight` itself, for an in-place merge); default a new tensor.
        backend: Backend.TRITON (one tiled pass over W) or Backend.TORCH (fp64 reference arithmetic);
            the members' string values are accepted too.
    Returns:
        out.
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    if out is None:
        out = torch.empty_like(weight)
    if Backend(backend) is Backend.TORCH:
        delta = float(scaling) * (lora_B.double() @ lora_A.double())
        merged = weight.double() - delta if subtract else weight.double() + delta
        return out.copy_(merged.float().to(weight.dtype))
    if N and K:
        specs.MERGE.launch(lambda meta: (configs.cdiv(N, meta["BLOCK_N"]), configs.cdiv(K, meta["BLOCK_K"])),
                           w=weight, b=lora_B, a=lora_A, out=out, N=N, K=K, R=R, scaling=scaling,
                           SUBTRACT=subtract)
    return out
