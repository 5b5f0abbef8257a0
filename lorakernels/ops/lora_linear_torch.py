"""Plain-PyTorch backend of the fused LoRA linear: the default on CPU tensors.

Same contract as `lorakernels.ops.lora_linear` (same operand descriptions, same saved state:
x, U in fp32, the seed), written with whole-tensor torch ops; one strategy, whatever the
plan's base GEMM. The dropout mask comes from a torch.Generator seeded with the seed,
regenerated in backward, never stored; it is a different stream from the Triton kernels'
Philox mask.
"""

import torch

from lorakernels.operands import GradsNeeded


def torch_keep_mask(seed, M, K, dropout_p, device):
    """(M, K) boolean keep-mask of the torch backend for `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand((M, K), generator=generator, device=device) >= dropout_p


def _keep_scale(adapter, M, K, device):
    """keep / (1 - p) as an fp32 (M, K) tensor, or None without dropout."""
    if not adapter.has_dropout:
        return None
    seed = adapter.seed if isinstance(adapter.seed, int) else int(adapter.seed)  # a device seed: read on the host
    return torch_keep_mask(seed, M, K, adapter.dropout_p, device) / (1.0 - adapter.dropout_p)


def _dropped(x, keep_scale):
    """Xd = X * keep / (1 - p) in fp32."""
    x = x.float()
    return x if keep_scale is None else x * keep_scale


def _rank_scale(adapter):
    """What multiplies every adapter's columns of U or V [M, R] into the rank-R term's left operand:
    the scaling; with segments, each column's adapter scaling where the row owns the column, else 0."""
    return adapter.scaling if adapter.segments is None else adapter.segments.owned_scale(adapter.rank)


def lora_forward(x, base, adapter, plan):
    """Torch forward: returns (y [M, N] in x's dtype, u = Xd A^T [M, R] fp32; with segments, each
    row's own adapter's columns [M, max_rank], as the kernels keep it)."""
    u = _dropped(x, _keep_scale(adapter, x.shape[0], x.shape[1], x.device)) @ adapter.lora_A.float().t()
    y = torch.nn.functional.linear(x, base.dense(x.dtype), base.bias)
    y = y.addmm_((u * _rank_scale(adapter)).to(x.dtype), adapter.lora_B.to(x.dtype).t())
    return y, u if adapter.segments is None else adapter.segments.compact(u)


def lora_backward(dy, x, u, base, adapter, plan, needs=GradsNeeded()):
    """Torch backward: returns (dx, dA, dB), None for those not needed (x is needed only for dA)."""
    M, K = dy.shape[0], base.in_features
    dy32 = dy.float()
    # V = s dY B [M, R] fp32: with segments, each row's own adapter's columns only.
    v = dy32 @ adapter.lora_B.float() * _rank_scale(adapter) if (needs.dx or needs.da) else None
    if needs.db:
        segments = adapter.segments
        scaled_u = u * adapter.scaling if segments is None else \
            segments.expand(u, adapter.rank) * segments.row_scale()[:, None]
        db = (dy32.t() @ scaled_u).to(adapter.lora_B.dtype)
    else:
        db = None
    # The mask is regenerated once and serves both dA and dX.
    keep_scale = _keep_scale(adapter, M, K, dy.device) if (needs.da or needs.dx) else None
    da = (v.t() @ _dropped(x, keep_scale)).to(adapter.lora_A.dtype) if needs.da else None
    dx = None
    if needs.dx:
        lora_term = v @ adapter.lora_A.float()
        if keep_scale is not None:
            lora_term = lora_term * keep_scale
        dx = (dy @ base.dense(dy.dtype)).add_(lora_term.to(dy.dtype))
    return dx, da, db
