"""The autograd Function (layer 3) and the functional form of the fused LoRA linear."""

import os

import torch

from lorakernels import ops
from lorakernels._validation import check_lora_linear_inputs
from lorakernels.ops.configs import interpreting
from lorakernels.ops.lora_linear import base_gemm_strategy

BACKEND_ENV = "LORAKERNELS_BACKEND"
BACKEND_CHOICES = ("auto", "triton", "torch")

_IMPLEMENTATIONS = {
    "triton": (ops.lora_forward, ops.lora_backward),
    "torch": (ops.lora_forward_torch, ops.lora_backward_torch),
}


def resolve_backend(requested, device):
    """'triton' or 'torch' for tensors on `device`.

    `requested` (or the LORAKERNELS_BACKEND environment variable when it is None) is
    'auto' (Triton on CUDA, and on CPU under TRITON_INTERPRET=1; torch otherwise),
    'triton' or 'torch'.
    """
    choice = requested if requested is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES} (argument or env {BACKEND_ENV}); got {choice!r}")
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if choice == "auto":
        return "triton" if triton_runs_here else "torch"
    if choice == "triton" and not triton_runs_here:
        raise ValueError(f"backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                         f"before lorakernels is imported; got tensors on {device}")
    return choice


def draw_seed():
    """Dropout seed from torch's default CPU generator.

    `torch.manual_seed` reproduces it and `torch.utils.checkpoint` (which restores the CPU
    RNG state) replays it on recompute. Drawing on the CPU never synchronizes a GPU.
    """
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def _as_rows(t):
    """2-D [M, features] view (a copy only if no view exists) with a unit last-dim stride."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T with fused kernels.

    Saves x (only if lora_A needs a gradient), U = dropout(x) A^T (fp32, [M, R]; only if
    lora_B needs one) and the dropout seed for backward, plus the parameters. The dropout
    mask is regenerated from the seed, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend, base_gemm):
        forward_impl, _ = _IMPLEMENTATIONS[backend]
        seed = draw_seed() if dropout_p > 0 else 0
        x_rows = _as_rows(x)
        y, u = forward_impl(x_rows, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base_gemm=base_gemm)
        needs_da, needs_db = ctx.needs_input_grad[3:5]
        ctx.save_for_backward(x if needs_da else None, weight, lora_A, lora_B, u if needs_db else None)
        ctx.hyper = (scaling, dropout_p, seed, backend, base_gemm, bias is not None, x.shape)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        scaling, dropout_p, seed, backend, base_gemm, has_bias, x_shape = ctx.hyper
        needs_dx, _, needs_dbias, needs_da, needs_db = ctx.needs_input_grad[:5]
        if needs_dx or needs_da or needs_db:
            _, backward_impl = _IMPLEMENTATIONS[backend]
            dx, da, db = backward_impl(_as_rows(dy), _as_rows(x) if x is not None else None, weight, lora_A, lora_B, u,
                                       scaling, dropout_p, seed, needs_dx=needs_dx, needs_da=needs_da,
                                       needs_db=needs_db, base_gemm=base_gemm)
        else:
            dx = da = db = None
        if dx is not None:
            dx = dx.view(x_shape)
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if has_bias and needs_dbias else None
        return dx, None, dbias, da, db, None, None, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None, base_gemm=None):
    """Fused LoRA linear: y = x W^T + b + scaling * dropout(x) A^T B^T.

    Args:
        x: [*, in_features], fp32/fp16/bf16, any strides.
        weight: [out_features, in_features], frozen, x's dtype. bias: [out_features] or None.
        lora_A: [r, in_features]; lora_B: [out_features, r]; x's dtype or fp32.
        scaling: lora_alpha / r (or lora_alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout on the input of A, in [0, 1). training: False disables dropout.
        backend: 'auto' | 'triton' | 'torch' (default: env LORAKERNELS_BACKEND, else 'auto').
        base_gemm: 'triton' | 'cublas' (default: env LORAKERNELS_BASE_GEMM, else 'triton').
    Returns:
        y: [*, out_features] in x's dtype.
    """
    check_lora_linear_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if weight.requires_grad:
        raise ValueError("lora_linear keeps the base weight frozen; got weight.requires_grad=True "
                         f"(weight {tuple(weight.shape)}). Call weight.requires_grad_(False).")
    backend = resolve_backend(backend, x.device)
    base_gemm = base_gemm_strategy(base_gemm)
    p = float(dropout_p) if training else 0.0
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), p, backend, base_gemm)
