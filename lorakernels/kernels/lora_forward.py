"""Forward kernels of the fused LoRA linear.

    U = Xd @ A^T                   (F1, lora_down_kernel)
    Y = X @ W^T + b + s * U @ B^T  (F2, lora_linear_fwd_kernel)

X: [M, K], W: [N, K], b: [N], A: [R, K], B: [N, R], U: [M, R] fp32.
Xd = X * keep / (1 - p) exists only in registers; the mask comes from the seed.
The rank-R products run on tensor cores in X's dtype (adapters, which may be fp32,
are cast tile by tile), accumulated in fp32. In F1 (and the backward's rank-R kernels)
`R_PAD` >= 16 is the padded rank that `tl.dot` needs, ranks >= R masked to zero; F2 and
B2 loop over the rank RANK_CHUNK at a time.
"""

import triton
import triton.language as tl

from lorakernels.kernels.dropout import load_dropped

# F2 and B2 add the rank-R term 16 ranks at a time (the smallest `tl.dot` K): the tiles it
# needs stay small whatever the rank, so no register or shared-memory cost grows with R.
# 32-wide chunks spilled with fp32 adapters on 4-warp 128 x 64 tiles (build gate, sm_80/sm_90).
RANK_CHUNK = tl.constexpr(16)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), GROUP_M row-tiles at a time, for L2 reuse."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["seed"])
def lora_down_kernel(
    x_ptr,
    a_ptr,
    u_ptr,
    M,
    K,
    R,
    stride_xm,
    stride_am,
    stride_um,
    seed,
    p,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """F1: one pass over X, dropout applied in registers, U = Xd @ A^T written in fp32.

    Grid: (cdiv(M, BLOCK_M),).
    """
    dot_dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < M
    rank_ok = ranks < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        x = load_dropped(x_ptr, rows, cols, stride_xm, row_ok[:, None] & col_ok[None, :], seed, p, HAS_DROPOUT)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_am + cols[:, None],
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(x, a_t.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
    tl.store(u_ptr + rows[:, None] * stride_um + ranks[None, :], acc,
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def lora_linear_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_wn,
    stride_um,
    stride_bn,
    stride_ym,
    scaling,
    HAS_BIAS: tl.constexpr,
    BASE_GEMM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """F2: Y = X @ W^T + b + s * U @ B^T, one fp32 accumulator, Y rounded and written once.

    With BASE_GEMM=False the X @ W^T term is skipped (Y = b + s U B^T), for the strategy
    that lets cuBLAS add the base GEMM afterwards (`Y.addmm_(X, W.T)`).
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    """
    dot_dtype = x_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < N

    # The LoRA term first, RANK_CHUNK ranks at a time, so that no U or B tile is live next to
    # the main loop. s is folded into the fp32 U tile before rounding to the dot dtype.
    scaling = tl.cast(scaling, tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, RANK_CHUNK):
        ranks = r0 + tl.arange(0, RANK_CHUNK)
        rank_ok = ranks < R
        u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + outs[None, :] * stride_bn + ranks[:, None],
                      mask=rank_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot((u * scaling).to(dot_dtype), b_t.to(dot_dtype), acc, input_precision=INPUT_PRECISION)

    if BASE_GEMM:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            col_ok = cols < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w_t = tl.load(w_ptr + outs[None, :] * stride_wn + cols[:, None],
                          mask=col_ok[:, None] & out_ok[None, :], other=0.0)
            acc = tl.dot(x, w_t, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs, mask=out_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + outs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])
