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


@triton.jit
def low_rank_tile(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, rows, cols, row_ok, col_ok, R, scaling,
                  dot_dtype: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + scaling * P[rows, :R] @ Q[:R, cols], RANK_CHUNK ranks at a time.

    P is [M, R] fp32 with unit rank stride (U or V); Q is addressed as Q[r, c] =
    q_ptr + r * stride_qr + c * stride_qc (B^T in F2, A in B2). The scaling is folded into the
    fp32 P tile before it is rounded to `dot_dtype`; each chunk is a tile no larger than a
    main-loop step, so nothing of the rank-R term stays live next to the main loop.
    """
    for r0 in range(0, R, RANK_CHUNK):
        ranks = r0 + tl.arange(0, RANK_CHUNK)
        rank_ok = ranks < R
        p = tl.load(p_ptr + rows[:, None] * stride_pm + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        q = tl.load(q_ptr + ranks[:, None] * stride_qr + cols[None, :] * stride_qc,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot((p * scaling).to(dot_dtype), q.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
    return acc


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

    # The LoRA term s * U @ B^T first (B^T[r, n] = B[n, r]), then the main loop adds X @ W^T.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = low_rank_tile(acc, u_ptr, stride_um, b_ptr, 1, stride_bn, rows, outs, row_ok, out_ok, R,
                        tl.cast(scaling, tl.float32), dot_dtype, INPUT_PRECISION)

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
