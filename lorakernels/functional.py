"""The autograd layer (layer 3) and the functional form of the fused LoRA linear.

Two autograd paths share one forward body, one backward body and one saved state: torch.library
custom ops with a registered autograd formula, which torch.compile sees as opaque nodes, and
a plain autograd.Function for eager mode, which skips the custom-op dispatch on every call.
"""

import contextlib
import os
from typing import Optional, Tuple

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
    """Dropout seed (an int64 CPU scalar tensor) from torch's default CPU generator.

    `torch.manual_seed` reproduces it and `torch.utils.checkpoint` (which restores the CPU
    RNG state) replays it on recompute. Drawing on the CPU never synchronizes a GPU. The
    device is explicit: under `torch.set_default_device("cuda")` the draw would otherwise
    come from the CUDA generator, which checkpoint recompute does not replay.
    """
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device="cpu")


def _as_rows(t):
    """2-D [M, features] view (a copy only if no view exists) with a unit last-dim stride."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


# The fused LoRA linear as two torch.library custom ops with a registered autograd formula:
# torch.compile(fullgraph=True) sees one opaque node per direction (fake implementations give
# it the output shapes); eager mode runs the same bodies through _EagerLoRALinear (below).
# The dropout seed, the scaling and dropout_p travel in one float64 CPU tensor
# `scalars` = [seed, scaling, p]: the seed is drawn
# outside the op (so the op is a pure function of its inputs), and a tensor, unlike a float
# argument of a custom op (compiled once per value), is data to torch.compile: a new seed never
# recompiles, a new scaling or p at most once (when automatic dynamic makes it symbolic).
# Reading it inside the op costs no GPU synchronization (it lives on the CPU).


def _forward(x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm):
    """(y [M, N], u [M, R] fp32): the body of both autograd paths."""
    forward_impl, _ = _IMPLEMENTATIONS[backend]
    seed, scaling, dropout_p = _unpack(scalars)
    # Operand dtypes were settled by `lora_linear` (autocast included): no casting inside.
    with _autocast_off(x.device.type):
        return forward_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base_gemm=base_gemm)


def _backward_grads(dy, x, weight, lora_A, lora_B, u, scalars, backend, base_gemm, needs_dx, needs_da, needs_db):
    """(dx, dA, dB), None where not needed: the body of both autograd paths."""
    _, backward_impl = _IMPLEMENTATIONS[backend]
    seed, scaling, dropout_p = _unpack(scalars)
    with _autocast_off(dy.device.type):
        return backward_impl(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, needs_dx=needs_dx,
                             needs_da=needs_da, needs_db=needs_db, base_gemm=base_gemm)


def _autocast_off(device_type):
    # Entering an autocast context costs microseconds per call: only when autocast is on.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _unpack(scalars):
    seed, scaling, dropout_p = scalars.tolist()
    return int(seed), scaling, dropout_p


@torch.library.custom_op("lorakernels::lora_linear_forward", mutates_args=())
def lora_linear_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                           lora_B: torch.Tensor, scalars: torch.Tensor, backend: str,
                           base_gemm: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], u [M, R] fp32) for 2-D x with a unit last-dim stride (see `lora_linear`)."""
    return _forward(x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm)


@lora_linear_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("lorakernels::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(dy: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, u: Optional[torch.Tensor], scalars: torch.Tensor, backend: str,
                            base_gemm: str, needs_dx: bool, needs_da: bool,
                            needs_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    grads = _backward_grads(dy, x, weight, lora_A, lora_B, u, scalars, backend, base_gemm, needs_dx, needs_da,
                            needs_db)
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, u, scalars, backend, base_gemm, needs_dx, needs_da, needs_db):
    return (dy.new_empty((dy.shape[0], weight.shape[1]) if needs_dx else (0,)),
            lora_A.new_empty(lora_A.shape if needs_da else (0,)),
            lora_B.new_empty(lora_B.shape if needs_db else (0,)))


def _save(ctx, x, weight, bias, lora_A, lora_B, u, scalars, backend, base_gemm):
    """Saves x only if lora_A needs a gradient and U only if lora_B does; never the mask."""
    ctx.save_for_backward(x if lora_A.requires_grad else None, weight, lora_A, lora_B,
                          u if lora_B.requires_grad else None, scalars)
    ctx.hyper = (backend, base_gemm, bias is not None)


def _grads_of_inputs(ctx, dy, backward):
    """The gradients of (x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm)."""
    x, weight, lora_A, lora_B, u, scalars = ctx.saved_tensors
    backend, base_gemm, has_bias = ctx.hyper
    needs_dx, _, needs_dbias, needs_da, needs_db = ctx.needs_input_grad[:5]
    dx = da = db = None
    if needs_dx or needs_da or needs_db:
        dx, da, db = backward(dy.contiguous(), x, weight, lora_A, lora_B, u, scalars, backend, base_gemm,
                              needs_dx, needs_da, needs_db)
    dbias = dy.sum(0) if has_bias and needs_dbias else None
    return (dx if needs_dx else None, None, dbias, da if needs_da else None, db if needs_db else None,
            None, None, None)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs[:5], output[1], *inputs[5:])


def _backward(ctx, dy, du):
    del du  # U is an internal output: nothing flows back through it
    return _grads_of_inputs(ctx, dy, lora_linear_backward_op)


lora_linear_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRALinear(torch.autograd.Function):
    """The same forward, backward and saved state as the custom ops, for eager mode.

    A custom op call goes through the dispatcher, the registered autograd wrapper and a
    torch.compile guard, in both directions: on a 2-core CPU that added about 175 us of Python
    per layer per forward + backward, the order of a GPU's time for the GEMMs of a layer with
    a few thousand tokens, so eager training would wait on the host. torch.compile keeps
    using the custom ops (`lora_linear` switches on `torch.compiler.is_compiling()`), where
    that cost is paid once, at tracing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm):
        y, u = _forward(x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm)
        _save(ctx, x, weight, bias, lora_A, lora_B, u, scalars, backend, base_gemm)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads_of_inputs(ctx, dy, _backward_grads)


def _autocast_operands(x, weight, bias, lora_A, lora_B):
    """Under torch.autocast, compute as nn.Linear would: x, weight and bias in the autocast dtype.

    fp32 adapters stay fp32 (the kernels cast their tiles); adapters in another dtype follow
    the autocast dtype. The output then has the autocast dtype.
    """
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return x, weight, bias, lora_A, lora_B  # not a float input: left for validation to reject
    cast = [t.to(dtype) if t is not None else None for t in (x, weight, bias)]
    adapters = [a if a.dtype == torch.float32 else a.to(dtype) for a in (lora_A, lora_B)]
    return (*cast, *adapters)


_ONE = torch.ones((), dtype=torch.float64, device="cpu")


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
    if isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, lora_A, lora_B = _autocast_operands(x, weight, bias, lora_A, lora_B)
    check_lora_linear_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if weight.requires_grad:
        raise ValueError("lora_linear keeps the base weight frozen; got weight.requires_grad=True "
                         f"(weight {tuple(weight.shape)}). Call weight.requires_grad_(False).")
    backend = resolve_backend(backend, x.device)
    base_gemm = base_gemm_strategy(base_gemm)
    p = dropout_p if training else 0.0
    if torch.compiler.is_compiling():
        seed = draw_seed() if p > 0 else torch.zeros((), dtype=torch.int64, device="cpu")
        # Built by tensor arithmetic: torch.compile traces a float added to a tensor without
        # specializing on its value (torch.tensor / as_tensor of a float would).
        scalars = torch.stack([seed.to(torch.float64), _ONE * scaling, _ONE * p])
        y, _ = lora_linear_forward_op(_as_rows(x), weight, bias, lora_A, lora_B, scalars, backend, base_gemm)
    else:
        seed = int(draw_seed()) if p > 0 else 0
        scalars = torch.tensor([seed, scaling, p], dtype=torch.float64, device="cpu")
        y = _EagerLoRALinear.apply(_as_rows(x), weight, bias, lora_A, lora_B, scalars, backend, base_gemm)
    return y.view(*x.shape[:-1], weight.shape[0])
