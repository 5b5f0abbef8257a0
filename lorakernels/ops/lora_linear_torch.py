"""Plain-PyTorch backend of the fused LoRA linear: the default on CPU tensors.

Same contract as `lorakernels.ops.lora_linear` (same arguments, same saved state: x, U
in fp32, the seed), written with whole-tensor torch ops. The dropout mask comes from a
torch.Generator seeded with the seed, regenerated in backward, never stored; it is a
different stream from the Triton kernels' Philox mask.
"""

import torch


def torch_keep_mask(seed, M, K, dropout_p, device):
    """(M, K) boolean keep-mask of the torch backend for `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand((M, K), generator=generator, device=device) >= dropout_p


def _keep_scale(seed, M, K, dropout_p, device):
    """keep / (1 - p) as an fp32 (M, K) tensor, or None without dropout."""
    if dropout_p == 0:
        return None
    return torch_keep_mask(seed, M, K, dropout_p, device) / (1.0 - dropout_p)


def _dropped(x, keep_scale):
    """Xd = X * keep / (1 - p) in fp32."""
    x = x.float()
    return x if keep_scale is None else x * keep_scale


def lora_forward_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base_gemm=None):
    """Torch forward: returns (y [M, N] in x's dtype, u = Xd A^T [M, R] fp32)."""
    del base_gemm  # one strategy here
    u = _dropped(x, _keep_scale(seed, x.shape[0], x.shape[1], dropout_p, x.device)) @ lora_A.float().t()
    y = torch.nn.functional.linear(x, weight, bias)
    y = y.addmm_((u * scaling).to(x.dtype), lora_B.to(x.dtype).t())
    return y, u


def lora_backward_torch(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                        needs_dx=True, needs_da=True, needs_db=True, base_gemm=None):
    """Torch backward: returns (dx, dA, dB), None for those not needed (x is needed only for dA)."""
    del base_gemm
    M, K = dy.shape[0], weight.shape[1]
    dy32 = dy.float()
    v = scaling * (dy32 @ lora_B.float()) if (needs_dx or needs_da) else None
    db = (scaling * (dy32.t() @ u)).to(lora_B.dtype) if needs_db else None
    # The mask is regenerated once and serves both dA and dX.
    keep_scale = _keep_scale(seed, M, K, dropout_p, dy.device) if (needs_da or needs_dx) else None
    da = (v.t() @ _dropped(x, keep_scale)).to(lora_A.dtype) if needs_da else None
    dx = None
    if needs_dx:
        lora_term = v @ lora_A.float()
        if keep_scale is not None:
            lora_term = lora_term * keep_scale
        dx = (dy @ weight).add_(lora_term.to(dy.dtype))
    return dx, da, db
