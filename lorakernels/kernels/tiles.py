"""Tile helpers shared by the kernels: output-tile order and the rank-R term of the fused GEMMs."""

import triton
import triton.language as tl

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
