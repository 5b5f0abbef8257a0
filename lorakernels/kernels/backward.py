"""Backward kernels of the fused LoRA linear (layer 1).

    V  = s * dY @ B                           [M, R]  (B1, b1_grad_dy_kernel)
    dB = s * dY^T @ U                         [N, R]  (B1 partials, or B3 on dY at large ranks)
    dX = dY @ W + (V @ A) * keep / (1 - p)    [M, K]  (B2, b2_grad_x_kernel: the GEMM core)
    dA = V^T @ Xd                             [R, K]  (B3, b3_adapter_grad_kernel)

Reductions over M are two-stage: each program writes an fp32 partial for its slice of
rows, then reduce_partials_kernel sums the partials in a fixed order. No atomics, so
the same inputs give the same bits on every run. B1 (and the forward's F1) split their
reduction over N (K) the same way where the batch is too small to fill the GPU.
"""

import triton
import triton.language as tl

from lorakernels.kernels.dropout import load_dropped
from lorakernels.kernels.gemm_core import fused_gemm_persistent_tma, fused_gemm_tile
from lorakernels.kernels.tiles import rank_dot, split_range


@triton.jit(do_not_specialize=["num_splits"])
def b1_grad_dy_kernel(dy_ptr, b_ptr, u_ptr, v_ptr, db_part_ptr, seg_ptr, seg_rank_start_ptr, seg_scale_ptr, M, N, R,
                      stride_dym, stride_bn, stride_um, stride_vs, stride_vm, num_splits, scaling,
                      COMPUTE_V: tl.constexpr, COMPUTE_DB: tl.constexpr, SEGMENTED: tl.constexpr,
                      RANK_FP32: tl.constexpr, RANK_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """B1: one pass over a BLOCK_M-row slab of dY gives V and the slab's dB partial.

    Split over N: program (i, j) takes the j-th of `num_splits` ranges of N (whole BLOCK_N steps,
    as even as they divide). v is fp32 [num_splits, M, width]: V itself with one split (no further
    pass), else the splits' partials of V, which `reduce_partials_kernel` sums in split order;
    each holds scaling * dY[:, range] @ B[range] (the launcher passes scaling 1 and lets the
    reduction scale). db_part is fp32 [cdiv(M, BLOCK_M), N, R], unscaled: slab i's partial, whose
    rows (N) each split writes for its own range, so the partials do not depend on the split.
    SEGMENTED (several adapters, `operands.Segments`; R is their summed rank): program (i, j, s)
    takes the rows of slab i that use segment s: v[j]'s first r_s columns for them (unscaled: s is
    1; v zeroed beforehand), and the slab's dB partial in segment s's columns, times its scaling
    (a slab without rows of s writes zeros there).
    Grid: (cdiv(M, BLOCK_M), num_splits, number of segments; 1 without).
    """
    dot_dtype: tl.constexpr = tl.float32 if RANK_FP32 else dy_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < M
    n_start, n_stop = split_range(tl.program_id(1), num_splits, N, BLOCK_N)
    if SEGMENTED:
        segment = tl.program_id(2)
        row_ok = row_ok & (tl.load(seg_ptr + rows, mask=row_ok, other=-1) == segment)
        start = tl.load(seg_rank_start_ptr + segment)
        rank = tl.load(seg_rank_start_ptr + segment + 1) - start
        db_scale = tl.load(seg_scale_ptr + segment)
        b_ptr += start
        db_part_ptr += start
    else:
        rank = R
        db_scale = 1.0
    rank_ok = ranks < rank
    u = u_ptr  # unused without COMPUTE_DB
    if COMPUTE_DB:
        u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(dot_dtype)
        db_part_ptr += pid * N * R
    v_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # With segments, a slab without rows of this program's segment still runs the loop: its loads
    # are masked (no memory moves), and skipping it (a loop bound from the rows' segments) spilled
    # registers at R_PAD 256 on sm_90 (build gate).
    for n0 in range(n_start, n_stop, BLOCK_N):
        v_acc = _dy_step(v_acc, dy_ptr, b_ptr, u, db_part_ptr, rows, ranks, row_ok, rank_ok, n0, N, R, stride_dym,
                         stride_bn, db_scale, COMPUTE_V, COMPUTE_DB, SEGMENTED, dot_dtype, RANK_PRECISION, BLOCK_N)
    if COMPUTE_V:
        tl.store(v_ptr + tl.program_id(1).to(tl.int64) * stride_vs + rows[:, None] * stride_vm + ranks[None, :],
                 v_acc * tl.cast(scaling, tl.float32), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _dy_step(v_acc, dy_ptr, b_ptr, u, db_part_ptr, rows, ranks, row_ok, rank_ok, n0, N, R, stride_dym, stride_bn,
             db_scale, COMPUTE_V: tl.constexpr, COMPUTE_DB: tl.constexpr, SEGMENTED: tl.constexpr,
             dot_dtype: tl.constexpr, RANK_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_N-column step of B1's pass over dY: V's accumulator, and the dB partial's columns stored."""
    outs = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    out_ok = outs < N
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + outs[None, :],
                 mask=row_ok[:, None] & out_ok[None, :], other=0.0).to(dot_dtype)
    if COMPUTE_V:
        b = tl.load(b_ptr + outs[:, None] * stride_bn + ranks[None, :],
                    mask=out_ok[:, None] & rank_ok[None, :], other=0.0)
        v_acc = rank_dot(dy, b.to(dot_dtype), v_acc, RANK_PRECISION)
    if COMPUTE_DB:
        db = tl.dot(tl.trans(dy), u, input_precision=RANK_PRECISION)
        if SEGMENTED:
            db = db * db_scale
        tl.store(db_part_ptr + outs[:, None] * R + ranks[None, :], db, mask=out_ok[:, None] & rank_ok[None, :])
    return v_acc


@triton.jit(do_not_specialize=["seed"])
def b2_grad_x_kernel(dy_ptr, w_ptr, v_ptr, a_ptr, seg_ptr, seg_rank_start_ptr, seg_scale_ptr, dx_ptr, M, N, K, R,
                     stride_dym, stride_wn, stride_vm, stride_am, stride_dxm, seed, p,
                     BASE_GEMM: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEGMENTED: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr,
                     SPLIT_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """B2: dX = dY @ W + (V @ A) * keep / (1 - p), dX written once.

    The GEMM core with dX as its output: BLOCK_N tiles dX's K (in_features) columns and BLOCK_K
    steps through the reduction over dY's N columns. With BASE_GEMM=False only the masked LoRA
    term is written (cuBLAS adds dY @ W afterwards). SEGMENTED: V compact and unscaled, each
    row's term its own adapter's times its scaling (`operands.Segments`).
    Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N),).
    """
    fused_gemm_tile(dy_ptr, stride_dym, w_ptr, stride_wn, w_ptr, w_ptr, 0,
                    v_ptr, stride_vm, a_ptr, stride_am, 1, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                    dx_ptr, dx_ptr, stride_dxm,
                    M, K, N, R, 1.0, seed, p,
                    False, False, False, HAS_DROPOUT, SEGMENTED, BASE_GEMM, INPUT_PRECISION, SPLIT_RANK, BLOCK_M,
                    BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit(do_not_specialize=["seed"])
def b3_adapter_grad_kernel(x_ptr, v_ptr, part_ptr, seg_ptr, seg_rank_start_ptr, seg_scale_ptr, M, K, R, stride_xm,
                           stride_vm, rows_per_split, seed, p, HAS_DROPOUT: tl.constexpr, SEGMENTED: tl.constexpr,
                           RANK_FP32: tl.constexpr, RANK_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """B3, adapter-gradient partials: part[s] = V[rows of s]^T @ Xd[rows of s], fp32 [S, R, K].

    dA: V = s dY B, X = x with its dropout mask regenerated from the seed. dB^T: V = U,
    X = dY, no dropout. X is read once. `rows_per_split` is a multiple of BLOCK_M.
    SEGMENTED (several adapters, `operands.Segments`; R is their summed rank, V compact):
    program (j, i, s) sums the rows of split i that use segment s into segment s's rows of the
    partial, times its scaling; the rows of other segments are masked (their loads move no memory:
    X is read once per segment a block holds; the dynamic skip of such blocks spilled registers).
    Grid: (cdiv(K, BLOCK_K), S, number of segments; 1 without).
    """
    dot_dtype: tl.constexpr = tl.float32 if RANK_FP32 else x_ptr.dtype.element_ty
    col0 = tl.program_id(0).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    split = tl.program_id(1).to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    col_ok = cols < K
    if SEGMENTED:
        segment = tl.program_id(2)
        start = tl.load(seg_rank_start_ptr + segment)
        rank = tl.load(seg_rank_start_ptr + segment + 1) - start
        part_ptr += start * K
    else:
        rank = R
    rank_ok = ranks < rank
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    if SEGMENTED:
        # Other segments' rows masked (their loads move no memory), one stage: pipelined next to the
        # segment mask, the loop spilled registers (build gate).
        for m0 in tl.range(row_start, row_end, BLOCK_M, num_stages=1):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < row_end
            row_ok = row_ok & (tl.load(seg_ptr + rows, mask=row_ok, other=-1) == segment)
            acc = _adapter_grad_step(acc, x_ptr, v_ptr, rows, col0, cols, ranks, row_ok, col_ok, rank_ok, stride_xm,
                                     stride_vm, seed, p, HAS_DROPOUT, dot_dtype, RANK_PRECISION)
    else:
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < row_end
            acc = _adapter_grad_step(acc, x_ptr, v_ptr, rows, col0, cols, ranks, row_ok, col_ok, rank_ok, stride_xm,
                                     stride_vm, seed, p, HAS_DROPOUT, dot_dtype, RANK_PRECISION)
    if SEGMENTED:
        acc = acc * tl.load(seg_scale_ptr + segment)
    tl.store(part_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc,
             mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _adapter_grad_step(acc, x_ptr, v_ptr, rows, col0, cols, ranks, row_ok, col_ok, rank_ok, stride_xm, stride_vm, seed,
                       p, HAS_DROPOUT: tl.constexpr, dot_dtype: tl.constexpr, RANK_PRECISION: tl.constexpr):
    """acc + V[rows]^T @ Xd[rows, cols] for one block of B3's rows."""
    x = load_dropped(x_ptr, rows, col0, cols, stride_xm, row_ok[:, None] & col_ok[None, :], seed, p, HAS_DROPOUT,
                     dot_dtype)
    v_t = tl.load(v_ptr + rows[None, :] * stride_vm + ranks[:, None],
                  mask=rank_ok[:, None] & row_ok[None, :], other=0.0)
    return rank_dot(v_t.to(dot_dtype), x, acc, RANK_PRECISION)


@triton.jit
def reduce_partials_kernel(part_ptr, out_ptr, num_parts, numel, cols, stride_ot, scaling,
                           TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
    """out = scaling * sum_s part[s], summed in s order (deterministic), cast once.

    part: fp32 [num_parts, rows, cols] contiguous (numel = rows * cols per part). out: contiguous
    [rows, cols]; with TRANSPOSED, out is the transposed view of a contiguous [cols, rows] tensor
    (element (i, j) at j * stride_ot + i): dB^T partials go straight into dB. The index split
    costs 32-36 registers (build gate: 64-68 against 32), so the contiguous case keeps a path without it.
    Grid: (cdiv(numel, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    part_ptrs = part_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # Four partials loaded, then added in order (the same sum as one at a time): the four loads are
    # independent, so they wait on memory together. A split rank-R pass over a small batch leaves up
    # to one partial per tile step (64 for 4096 columns in 64-wide steps) of a few KiB each; one load
    # in flight per add would make its reduction a chain of memory latencies.
    for _ in range(0, num_parts // 4):
        p0 = tl.load(part_ptrs, mask=ok, other=0.0)
        part_ptrs += numel
        p1 = tl.load(part_ptrs, mask=ok, other=0.0)
        part_ptrs += numel
        p2 = tl.load(part_ptrs, mask=ok, other=0.0)
        part_ptrs += numel
        p3 = tl.load(part_ptrs, mask=ok, other=0.0)
        part_ptrs += numel
        acc += p0
        acc += p1
        acc += p2
        acc += p3
    for _ in range(0, num_parts % 4):
        acc += tl.load(part_ptrs, mask=ok, other=0.0)
        part_ptrs += numel
    out_offs = offs
    if TRANSPOSED:
        # Element (i, j) of a [rows, cols] partial goes to j * stride_ot + i; in 32 bits where a
        # partial holds fewer than 2**31 elements (numel then arrives as an int32): a 64-bit
        # division by a runtime value compiles to a subroutine call (8 B of stack on sm_90 under
        # triton 3.6, build gate).
        if numel.dtype == tl.int32:
            small = offs.to(tl.int32)
            out_offs = (small % cols) * stride_ot + small // cols
        else:
            out_offs = (offs % cols) * stride_ot + offs // cols
    tl.store(out_ptr + out_offs, (acc * tl.cast(scaling, tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def b2_grad_x_tma_kernel(dy_desc, w_desc, v_ptr, a_ptr, seg_ptr, seg_rank_start_ptr, seg_scale_ptr, dx_desc, M, N,
                         K, R, stride_vm, stride_am, seed, p, HAS_DROPOUT: tl.constexpr, SEGMENTED: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, SPLIT_RANK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """B2 on Hopper: `b2_grad_x_kernel`'s math as persistent programs with TMA loads and stores.

    dy_desc: dY [M, N], block [BLOCK_M, BLOCK_K]; w_desc: W [N, K], block [BLOCK_K, BLOCK_N];
    dx_desc: dX [M, K], block [BLOCK_M, BLOCK_N]. Grid: (min(SMs, output tiles),).
    """
    fused_gemm_persistent_tma(dy_desc, w_desc, v_ptr, stride_vm, a_ptr, stride_am, 1, seg_ptr, seg_rank_start_ptr,
                              seg_scale_ptr, v_ptr, dx_desc, M, K, N, R, 1.0, seed, p,
                              False, False, HAS_DROPOUT, SEGMENTED, INPUT_PRECISION, SPLIT_RANK, BLOCK_M, BLOCK_N,
                              BLOCK_K, GROUP_M)


@triton.jit(do_not_specialize=["seed"])
def b2_grad_x_4bit_kernel(dy_ptr, codes_ptr, absmax_ptr, table_ptr, v_ptr, a_ptr, seg_ptr, seg_rank_start_ptr,
                          seg_scale_ptr, dx_ptr, M, N, K, R, stride_dym, stride_vm, stride_am, stride_dxm, quant_shift,
                          seed, p, HAS_DROPOUT: tl.constexpr, SEGMENTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          SPLIT_RANK: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """B2 with a 4-bit base (QLoRA): dX = dY W + (V A) * keep / (1 - p), W read from its packed
    codes as in `f2_forward_gemm_4bit_kernel`. Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N),)."""
    fused_gemm_tile(dy_ptr, stride_dym, codes_ptr, K, absmax_ptr, table_ptr, quant_shift,
                    v_ptr, stride_vm, a_ptr, stride_am, 1, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                    dx_ptr, dx_ptr, stride_dxm,
                    M, K, N, R, 1.0, seed, p,
                    False, True, False, HAS_DROPOUT, SEGMENTED, True, INPUT_PRECISION, SPLIT_RANK, BLOCK_M, BLOCK_N,
                    BLOCK_K, GROUP_M)
