"""Host functions (layer 2) of the fused LoRA linear: allocate, pick the config, launch.

Inputs arrive validated and flattened to 2-D with a unit last-dim stride
(`lorakernels.functional` does that). Math, shapes and dtypes: see the kernel modules.

Limitations:
- x, weight and bias share one dtype (fp32, fp16 or bf16); lora_A/lora_B are that dtype
  or fp32. The rank-R products run in x's dtype with fp32 accumulation (as PEFT under
  autocast does); U and V are kept in fp32.
- fp32 inputs use TF32 dots only when `torch.backends.cuda.matmul.allow_tf32` is set,
  as torch.matmul does; otherwise full-precision fp32 dots.
- Ranks 1..256 (padded to a power of two >= 16 inside the kernels).
- Gradients are deterministic: reductions over tokens are two-stage, fixed order.
- The dropout stream is Triton's Philox; it differs from torch's RNG (the CPU backend)
  and may differ between Triton versions. Same seed, same Triton: same mask.
"""

import os

import torch
import triton

from lorakernels.kernels.dropout import dropout_keep_mask_kernel
from lorakernels.kernels.lora_backward import (
    lora_adapter_grad_kernel,
    lora_grad_dy_kernel,
    lora_grad_x_kernel,
    reduce_partials_kernel,
)
from lorakernels.kernels.lora_forward import lora_down_kernel, lora_linear_fwd_kernel
from lorakernels.ops import configs

BASE_GEMM_ENV = "LORAKERNELS_BASE_GEMM"
BASE_GEMM_CHOICES = ("triton", "cublas")


# Which GEMM each fused kernel is, for its launch configs.
_GEMM_OF = {lora_linear_fwd_kernel: "forward", lora_grad_x_kernel: "grad_x"}


def _autotuned(kernel):
    # Candidates are pruned by activation size (the first argument): fp32 takes the narrow ones.
    def prune(candidates, named_args, **meta):
        return configs.gemm_configs(next(iter(named_args.values())).element_size(), _GEMM_OF[kernel])

    # BASE_GEMM in the key: without the base GEMM (the cuBLAS strategy) the kernel is a
    # memory-bound rank-R product, whose best tile is not the fused GEMM's.
    return triton.autotune(configs=configs.GEMM_CANDIDATES, key=["N", "K", "BASE_GEMM"],
                           prune_configs_by={"early_config_prune": prune})(kernel)


# One autotuner per (kernel, token-count bucket): the best tile for 512 tokens is not the best
# for 16k, and an autotune key can only name kernel arguments (M itself would retune at every
# new sequence length). Buckets are powers of two clamped to [64, 16384]; the compiled
# binaries are shared between them, only the choice of config is per bucket.
_AUTOTUNERS = {}


def token_bucket(M):
    """The autotuning bucket of a launch with M rows (tokens)."""
    return min(max(triton.next_power_of_2(M), 64), 16384)


def _autotuner(kernel, M):
    key = (kernel, token_bucket(M))
    if key not in _AUTOTUNERS:
        _AUTOTUNERS[key] = _autotuned(kernel)
    return _AUTOTUNERS[key]


def base_gemm_strategy(requested=None):
    """Who runs the frozen GEMM: 'triton' (fused kernel, default) or 'cublas' (torch.addmm, LoRA term fused)."""
    choice = requested or os.environ.get(BASE_GEMM_ENV, "triton")
    if choice not in BASE_GEMM_CHOICES:
        raise ValueError(f"base GEMM strategy must be one of {BASE_GEMM_CHOICES} (env {BASE_GEMM_ENV}); got {choice!r}")
    return choice


def _input_precision(dtype, device):
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch_gemm(kernel, M, num_tiles, args, meta, aligned_ints):
    """Launch F2 or B2 over M rows: fixed config under the interpreter or for unaligned operands,
    else autotuned (per N, K, BASE_GEMM, dtypes and token bucket of M).

    `aligned_ints` are the sizes and row strides the fast path expects divisible by 16 (as the
    JIT specializes them); with the tensors' 16-byte alignment they decide which path runs.
    """
    aligned = all(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor)) and all(
        i % 16 == 0 for i in aligned_ints)
    if configs.interpreting() or not aligned:
        elem_bytes = args[0].element_size()
        cfg = (configs.INTERPRETER_GEMM_CONFIG if configs.interpreting()
               else configs.unaligned_gemm_config(elem_bytes, _GEMM_OF[kernel]))
        kernel[(num_tiles(cfg.kwargs),)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                         num_stages=cfg.num_stages)
    else:
        _autotuner(kernel, M)[lambda m: (num_tiles(m),)](*args, **meta)


def _launch_f2(x, weight, bias, u, lora_B, y, R, scaling, base_gemm):
    """F2 into y: b + s U B^T, plus X W^T when base_gemm (the fused forward GEMM)."""
    M, K = x.shape
    N = weight.shape[0]
    _launch_gemm(
        lora_linear_fwd_kernel, M,
        lambda m: triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),
        (x, weight, bias if bias is not None else y, u, lora_B, y, M, N, K, R,
         x.stride(0), weight.stride(0), u.stride(0), lora_B.stride(0), y.stride(0), float(scaling)),
        dict(HAS_BIAS=bias is not None, BASE_GEMM=base_gemm, INPUT_PRECISION=_input_precision(x.dtype, x.device)),
        (N, K, x.stride(0), weight.stride(0), y.stride(0)))


def _launch_b2(dy, weight, v, lora_A, dx, R, seed, dropout_p, base_gemm):
    """B2 into dx: (V A) * keep / (1 - p), plus dY W when base_gemm (the fused dX GEMM)."""
    M, N = dy.shape
    K = weight.shape[1]
    _launch_gemm(
        lora_grad_x_kernel, M,
        lambda m: triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_N"]),
        (dy, weight, v, lora_A, dx, M, N, K, R, dy.stride(0), weight.stride(0), v.stride(0),
         lora_A.stride(0), dx.stride(0), seed, float(dropout_p)),
        dict(BASE_GEMM=base_gemm, HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=_input_precision(dy.dtype, dy.device)),
        (N, K, dy.stride(0), weight.stride(0), lora_A.stride(0), dx.stride(0)))


def _reduce_partials(partials, out, scaling):
    numel = out.numel()
    reduce_partials_kernel[(triton.cdiv(numel, configs.REDUCE_CONFIG["BLOCK"]),)](
        partials, out, partials.shape[0], numel, scaling, **configs.REDUCE_CONFIG)
    return out


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base_gemm="triton"):
    """Forward of the fused LoRA linear on 2-D inputs.

    Args:
        x: [M, K], unit last-dim stride. weight: [N, K]. bias: [N] or None.
        lora_A: [R, K]. lora_B: [N, R]. scaling: s. dropout_p: p (0 disables dropout).
        seed: Philox seed of the dropout mask. base_gemm: 'triton' or 'cublas'.
    Returns:
        (y [M, N] in x's dtype, u [M, R] fp32): u = Xd @ A^T, saved for backward.
    """
    M, K = x.shape
    N, R = lora_B.shape
    r_pad = configs.padded_rank(R)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, u
    precision = _input_precision(x.dtype, x.device)

    down = configs.down_config(r_pad, x.element_size())
    lora_down_kernel[(triton.cdiv(M, down["BLOCK_M"]),)](
        x, lora_A, u, M, K, R, x.stride(0), lora_A.stride(0), u.stride(0), seed, float(dropout_p),
        HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=precision, R_PAD=r_pad, **down)

    use_triton_gemm = base_gemm == "triton"
    _launch_f2(x, weight, bias, u, lora_B, y, R, scaling, use_triton_gemm)
    if not use_triton_gemm:
        y.addmm_(x, weight.t())  # cuBLAS adds X W^T to b + s U B^T in its epilogue (beta = 1).
    return y, u


def _adapter_grad(v, x, out, scaling, seed, dropout_p):
    """out [R, K] = scaling * V^T @ (X * keep / (1 - p)): dA (V = s dY B, X = x) or dB^T (V = U, X = dY).

    Rows are cut into slices (enough programs to fill the GPU); each slice's fp32 partial is
    summed in slice order by reduce_partials_kernel.
    """
    M, K = x.shape
    R = v.shape[1]
    r_pad = configs.padded_rank(R)
    cfg = configs.adapter_grad_config(r_pad, x.element_size())
    col_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    splits = max(1, min(row_blocks, triton.cdiv(configs.ADAPTER_GRAD_TARGET_PROGRAMS, col_tiles)))
    rows_per_split = triton.cdiv(row_blocks, splits) * cfg["BLOCK_M"]
    splits = triton.cdiv(M, rows_per_split)
    partials = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    lora_adapter_grad_kernel[(col_tiles, splits)](
        x, v, partials, M, K, R, x.stride(0), v.stride(0), rows_per_split, seed, float(dropout_p),
        HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=_input_precision(x.dtype, x.device), R_PAD=r_pad, **cfg)
    return _reduce_partials(partials, out, scaling)


def lora_backward(dy, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                  needs_dx=True, needs_da=True, needs_db=True, base_gemm="triton"):
    """Backward of the fused LoRA linear on 2-D inputs.

    Args:
        dy: [M, N] in x's dtype, unit last-dim stride. x, weight, lora_A, lora_B, u, scaling,
        dropout_p, seed: as in and from `lora_forward`; x may be None unless needs_da, u
        unless needs_db. needs_*: which gradients to compute.
    Returns:
        (dx [M, K] or None, dA [R, K] or None, dB [N, R] or None), in x's / the adapters' dtype.
    """
    M, N = dy.shape
    K = weight.shape[1]
    R = lora_B.shape[1]
    r_pad = configs.padded_rank(R)
    device = dy.device
    dx = torch.empty((M, K), device=device, dtype=dy.dtype) if needs_dx else None
    da = torch.empty_like(lora_A) if needs_da else None
    db = torch.empty_like(lora_B) if needs_db else None
    if M == 0:
        return tuple(g.zero_() if g is not None else None for g in (dx, da, db))
    precision = _input_precision(dy.dtype, device)
    needs_v = needs_dx or needs_da
    # dB rides along B1's pass over dY while its per-slab partials (M / BLOCK_M x N x R fp32)
    # cost fewer bytes than a second read of dY; at larger ranks a separate pass is cheaper.
    fuse_db = needs_db and r_pad <= configs.FUSED_DB_MAX_RANK

    # B1: V = s dY B (and, at small ranks, the dB partials), one pass over dY.
    v = torch.empty((M, R), device=device, dtype=torch.float32) if needs_v else None
    if needs_v or fuse_db:
        cfg = configs.grad_dy_config(r_pad, dy.element_size())
        num_slabs = triton.cdiv(M, cfg["BLOCK_M"])
        db_part = torch.empty((num_slabs, N, R), device=device, dtype=torch.float32) if fuse_db else None
        # Unused operands (u without dB, v without V) get a stand-in pointer: their code is compiled out.
        u_arg = u if fuse_db else dy
        v_arg = v if needs_v else dy
        lora_grad_dy_kernel[(num_slabs,)](
            dy, lora_B, u_arg, v_arg, db_part if fuse_db else dy, M, N, R, dy.stride(0), lora_B.stride(0),
            u_arg.stride(0), v_arg.stride(0),
            float(scaling), COMPUTE_V=needs_v, COMPUTE_DB=fuse_db, INPUT_PRECISION=precision, R_PAD=r_pad, **cfg)
        if fuse_db:
            _reduce_partials(db_part, db, float(scaling))
    if needs_db and not fuse_db:
        db_t = _adapter_grad(u, dy, torch.empty((R, N), device=device, dtype=lora_B.dtype), float(scaling), 0, 0.0)
        db.copy_(db_t.t())

    # B2: dX = dY W + (V A) * keep / (1 - p), written once.
    if needs_dx:
        use_triton_gemm = base_gemm == "triton"
        _launch_b2(dy, weight, v, lora_A, dx, R, seed, dropout_p, use_triton_gemm)
        if not use_triton_gemm:
            dx.addmm_(dy, weight)

    # dA = V^T Xd, X read once with its mask regenerated.
    if needs_da:
        _adapter_grad(v, x, da, 1.0, seed, dropout_p)
    return dx, da, db


def _unread_operand(row_stride, device):
    """A stand-in for the rank-R operands that R = 0 never reads: fp32 with the row stride of
    fp32 adapters at rank 16, so that the launch compiles and tunes as that fused call does."""
    return torch.empty((1, row_stride), device=device, dtype=torch.float32)


def base_gemm_forward(x, weight, bias=None):
    """Y = X W^T + b by F2 with the rank-R term switched off (R = 0): the fused forward's main
    loop alone, on the launch path the fused call takes, so that benchmarks can set it
    against cuBLAS (`torch.addmm`) on the same shapes. x: [M, K], weight: [N, K], one dtype."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    _launch_f2(x, weight, bias, _unread_operand(16, x.device), _unread_operand(16, x.device), y, 0, 1.0, True)
    return y


def base_gemm_grad_x(dy, weight):
    """dX = dY W by B2 with the rank-R term switched off (R = 0): see `base_gemm_forward`."""
    M, N = dy.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    _launch_b2(dy, weight, _unread_operand(16, dy.device), _unread_operand(K, dy.device), dx, 0, 0, 0.0, True)
    return dx


def dropout_keep_mask(seed, M, K, dropout_p, device):
    """The (M, K) boolean keep-mask the kernels regenerate for `seed` (tests and debugging only)."""
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    if M and K:
        cfg = configs.DROPOUT_MASK_CONFIG
        dropout_keep_mask_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))](
            out, M, K, out.stride(0), seed, float(dropout_p), **cfg)
    return out.bool()
