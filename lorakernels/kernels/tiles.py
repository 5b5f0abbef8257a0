"""Tile helpers shared by the kernels: output-tile order, split reduction ranges, and the rank-R
term of the fused GEMMs."""

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
def rank_dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b for one step of a rank-R kernel's reduction (F1 over K, B1 over N, B3 over rows).

    fp32 operands with "ieee" (fp32 adapters): the step's products summed from zero, then added
    to the accumulator once. A GPU runs such a dot as one FMA per k into its accumulator, so a
    reduction accumulated in place rounds every product at the size of the whole running sum;
    a step at a time, only BLOCK products are, at one extra add per BLOCK FMAs. In place, fp32 y
    came out 1.4-2x PEFT's error through U (K = 97, tests/gpu_dots.py's model of the FMA dot);
    a step at a time 0.6-1.5x there (PEFT's CPU GEMM sums a short reduction in vector lanes) and
    0.7-1.1x at K >= 1024. F1 halves its fp32 steps further (`forward._down_step`: two 16-deep
    chains per 32-column step). Tensor-core dots (16-bit, TF32) accumulate in place: the rounding
    of their operands dominates.
    """
    if a.dtype == tl.float32 and INPUT_PRECISION == "ieee":
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def split_range(split, num_splits, extent, BLOCK: tl.constexpr):
    """[start, stop) of range `split` of `num_splits` over a reduction of `extent` elements, cut at
    whole BLOCK steps as evenly as they divide (the first ranges take one step more than the
    last); the last range's stop is rounded up to a whole step (the kernels mask what lies past
    `extent`). 32-bit arithmetic: a 64-bit division is a called routine, and with it B1 spilled
    8 B of stack on sm_80 (build gate). No clamp of stop to `extent`: F1 with segments at rank 256
    (fp32 adapters) sits at its register limit on sm_90, and the clamp spilled 8 B there."""
    steps = tl.cdiv(extent, BLOCK)
    per_split = steps // num_splits
    longer = steps % num_splits
    start = (split * per_split + tl.minimum(split, longer)) * BLOCK
    return start, start + (per_split + (split < longer).to(tl.int32)) * BLOCK


@triton.jit
def split_dot(p, q, acc):
    """acc + p @ q for fp32 p and q, as three bf16 products: each operand split into a rounded
    high part and the rounded remainder, p_hi q_hi + p_hi q_lo + p_lo q_hi.

    bf16 parts keep fp32's range and 16 mantissa bits (relative error ~2^-16, far below the
    rounding of a 16-bit output), on 16-bit tensor cores, at the registers of 16-bit tiles:
    fp32 tiles with 3xTF32 dots spilled in F2 and B2 on sm_80 (build gate). bf16 even under
    fp16 activations: an fp16 high part of U * scaling overflows where the product does not.
    """
    p_hi = p.to(tl.bfloat16)
    q_hi = q.to(tl.bfloat16)
    p_lo = (p - p_hi.to(tl.float32)).to(tl.bfloat16)
    q_lo = (q - q_hi.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(p_hi, q_hi, acc)
    acc = tl.dot(p_hi, q_lo, acc)
    return tl.dot(p_lo, q_hi, acc)


@triton.jit
def low_rank_tile(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, rows, cols, row_ok, col_ok, R, scaling,
                  dot_dtype: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """acc + scaling * P[rows, :R] @ Q[:R, cols], RANK_CHUNK ranks at a time.

    P is [M, R] fp32 with unit rank stride (U or V); Q is addressed as Q[r, c] =
    q_ptr + r * stride_qr + c * stride_qc (B^T in F2, A in B2). The scaling is folded into the
    fp32 P tile; the product runs in `dot_dtype`, or with SPLIT (fp32 adapters under 16-bit
    activations) as `split_dot`'s three products, near fp32 accuracy. Each chunk is a tile no
    larger than a main-loop step, so nothing of the rank-R term stays live next to the main loop.
    """
    # One stage: pipelined after the fp32 main loop of F2 over a 4-bit base, it spilled 8 B on sm_80 (gate).
    for r0 in tl.range(0, R, RANK_CHUNK, num_stages=1):
        ranks = r0 + tl.arange(0, RANK_CHUNK)
        rank_ok = ranks < R
        p = tl.load(p_ptr + rows[:, None] * stride_pm + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        q = tl.load(q_ptr + ranks[:, None] * stride_qr + cols[None, :] * stride_qc,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _rank_chunk_dot(acc, p, q, scaling, dot_dtype, INPUT_PRECISION, SPLIT)
    return acc


# Several adapters in one batch (`operands.Segments`): a row-to-segment table (int32 [M], -1: no
# adapter), each segment's first column in the concatenated factors (int32 [S + 1], the last
# entry the summed rank) and its scaling (fp32 [S]).

@triton.jit
def segment_columns(rank_start_ptr, scale_ptr, segment):
    """(first column, rank, scaling) of `segment` in the concatenated factors."""
    start = tl.load(rank_start_ptr + segment)
    return start, tl.load(rank_start_ptr + segment + 1) - start, tl.load(scale_ptr + segment)


@triton.jit
def segmented_low_rank_tile(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, rows, cols, row_ok, col_ok,
                            seg_ptr, rank_start_ptr, seg_scale_ptr, scaling, dot_dtype: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """`low_rank_tile` for several adapters: each row's own adapter's term only,
    acc[m] + scaling * s_a P[m, :r_a] @ Q[start_a:start_a + r_a, cols], a = segment of row m.

    P is compact ([M, max_rank], each row its adapter's columns); Q is the concatenated factor. The
    tile loops over the segments between the smallest and the largest its rows use, each at its
    own rank (a segment with no row here runs zero rank steps): a tile whose rows all use one
    adapter costs what one adapter does. The rows' segments are reloaded where they are compared
    (a few bytes from L1) rather than kept live next to the accumulator: kept, they spilled
    registers in the fused GEMMs' largest tiles (build gate, sm_80 and sm_90).
    """
    segment = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
    first = tl.min(tl.where(segment >= 0, segment, 2**30), axis=0)
    last = tl.max(segment, axis=0)
    for s in tl.range(first, last + 1, num_stages=1):
        start, rank, s_scale = segment_columns(rank_start_ptr, seg_scale_ptr, s)
        has_rows = tl.max((tl.load(seg_ptr + rows, mask=row_ok, other=-1) == s).to(tl.int32), axis=0) > 0
        for r0 in tl.range(0, tl.where(has_rows, rank, 0), RANK_CHUNK, num_stages=1):
            ranks = r0 + tl.arange(0, RANK_CHUNK)
            mine = tl.load(seg_ptr + rows, mask=row_ok, other=-1) == s
            p = tl.load(p_ptr + rows[:, None] * stride_pm + ranks[None, :],
                        mask=mine[:, None] & (ranks < rank)[None, :], other=0.0)
            q = tl.load(q_ptr + (start + ranks)[:, None] * stride_qr + cols[None, :] * stride_qc,
                        mask=(ranks < rank)[:, None] & col_ok[None, :], other=0.0)
            acc = _rank_chunk_dot(acc, p, q, scaling * s_scale, dot_dtype, INPUT_PRECISION, SPLIT)
    return acc


@triton.jit
def _rank_chunk_dot(acc, p, q, scaling, dot_dtype: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    SPLIT: tl.constexpr):
    """acc + (scaling * p) @ q for one RANK_CHUNK of the rank-R term (see `low_rank_tile`)."""
    if SPLIT:
        acc = split_dot(p * scaling, q.to(tl.float32), acc)
    else:
        acc = tl.dot((p * scaling).to(dot_dtype), q.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
    return acc
