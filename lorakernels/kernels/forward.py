"""Forward kernels of the fused LoRA linear (layer 1).

    U = Xd @ A^T                   (F1, f1_dropout_down_kernel)
    Y = X @ W^T + b + s * U @ B^T  (F2, f2_forward_gemm_kernel: the GEMM core of gemm_core.py)

X: [M, K], W: [N, K], b: [N], A: [R, K], B: [N, R], U: [M, R] fp32.
Xd = X * keep / (1 - p) exists only in registers; the mask comes from the seed.
The rank-R products run in the adapters' precision, accumulated in fp32: in F1 (and the
backward's B1, B3) RANK_FP32 selects fp32 operands with RANK_PRECISION (full fp32 FMA dots
under 16-bit activations, `plan.low_rank_math`), X tiles converted in registers, never as a whole
tensor; in F2 and B2, SPLIT_RANK splits the fp32 operands into two bf16 parts (`tiles.split_dot`).
In F1 (and the backward's rank-R kernels) `R_PAD` >= 16 is the padded rank that `tl.dot`
needs, ranks >= R masked to zero; F2 and B2 loop over the rank 16 at a time
(`tiles.low_rank_tile`).
"""

import triton
import triton.language as tl

from lorakernels.kernels.dropout import load_dropped
from lorakernels.kernels.gemm_core import fused_gemm_persistent_tma, fused_gemm_tile
from lorakernels.kernels.tiles import rank_dot, split_range


@triton.jit(do_not_specialize=["seed", "num_splits"])
def f1_dropout_down_kernel(x_ptr, a_ptr, u_ptr, seg_ptr, seg_rank_start_ptr, M, K, R, stride_xm, stride_am,
                           stride_us, stride_um, num_splits, seed, p, HAS_DROPOUT: tl.constexpr,
                           SEGMENTED: tl.constexpr, RANK_FP32: tl.constexpr, RANK_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """F1: one pass over X, dropout applied in registers, U = Xd @ A^T written in fp32.

    Split over K: program (i, j) sums the j-th of `num_splits` ranges of K (whole BLOCK_K steps,
    as even as they divide) into u[j]. u is fp32 [num_splits, M, width]: U itself with one split
    (no further pass), else the splits' partials, which `reduce_partials_kernel` sums in split
    order. The mask is a function of the global (row, column), so splitting K keeps it.
    SEGMENTED (several adapters, `operands.Segments`): program (i, j, s) computes the rows of block i
    that use segment s, with that adapter's rows of the concatenated A, into u[j]'s first r_s
    columns; a block without such rows skips the pass over X. u must be zeroed beforehand.
    Grid: (cdiv(M, BLOCK_M), num_splits, number of segments; 1 without).
    """
    dot_dtype: tl.constexpr = tl.float32 if RANK_FP32 else x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < M
    k_start, k_stop = split_range(tl.program_id(1), num_splits, K, BLOCK_K)
    if SEGMENTED:
        segment = tl.program_id(2)
        row_ok = row_ok & (tl.load(seg_ptr + rows, mask=row_ok, other=-1) == segment)
        start = tl.load(seg_rank_start_ptr + segment)
        rank = tl.load(seg_rank_start_ptr + segment + 1) - start
        a_ptr += start * stride_am
        k_end = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, k_stop, k_start)
    else:
        rank = R
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if SEGMENTED:
        # One stage, not the config's: at R_PAD 256 with fp32 adapters the pipelined loop next to
        # the segment mask spilled registers on sm_80 (build gate; two stages spilled too).
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):
            acc = _down_step(acc, x_ptr, a_ptr, rows, ranks, row_ok, rank_ok, k0, K, stride_xm, stride_am, seed, p,
                             HAS_DROPOUT, dot_dtype, RANK_PRECISION, BLOCK_K)
    else:
        for k0 in range(k_start, k_stop, BLOCK_K):
            acc = _down_step(acc, x_ptr, a_ptr, rows, ranks, row_ok, rank_ok, k0, K, stride_xm, stride_am, seed, p,
                             HAS_DROPOUT, dot_dtype, RANK_PRECISION, BLOCK_K)
    u_ptr += tl.program_id(1).to(tl.int64) * stride_us
    tl.store(u_ptr + rows[:, None] * stride_um + ranks[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _down_step(acc, x_ptr, a_ptr, rows, ranks, row_ok, rank_ok, k0, K, stride_xm, stride_am, seed, p,
               HAS_DROPOUT: tl.constexpr, dot_dtype: tl.constexpr, RANK_PRECISION: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """acc + Xd[rows, k0:k0 + BLOCK_K] @ A[:, k0:k0 + BLOCK_K]^T: one step of F1's pass over X.

    fp32 FMA dots ("ieee"): a 32-column step is two 16-deep FMA chains from zero, over its even and
    its odd columns, summed and added to acc once (`tiles.rank_dot` sums a step from zero; this
    halves the chain). U's rounding reaches fp32 y undamped (y = ... + s U B^T): with one 32-deep
    chain per step, y's max error against fp64 was 1.17x the fp32 PyTorch reference's (median over
    3000 random 33 x 40 -> 24 rank-8 layers at p = 0.1 under tests/gpu_dots.py's FMA model; p90
    1.61x, max 2.93x), with two 16-deep ones 1.09x (p90 1.50x, max 2.65x). X's tile is split within
    each thread's registers (a thread holds 4 consecutive columns) and A's halves are loaded as
    such: no layout conversion; the two dots stage their operands in the shared memory the one
    used (build gate: same shared memory, no spills).
    """
    cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    col_ok = cols < K
    x = load_dropped(x_ptr, rows, k0, cols, stride_xm, row_ok[:, None] & col_ok[None, :], seed, p, HAS_DROPOUT,
                     dot_dtype)
    if dot_dtype == tl.float32 and RANK_PRECISION == "ieee" and BLOCK_K > 16:
        tl.static_assert(BLOCK_K == 32, "F1: fp32 FMA dots take steps of 16 or 32 columns")
        x_even, x_odd = tl.split(tl.reshape(x, [x.shape[0], BLOCK_K // 2, 2]))
        even = k0 + 2 * tl.arange(0, BLOCK_K // 2).to(tl.int64)
        a_even = tl.load(a_ptr + ranks[None, :] * stride_am + even[:, None],
                         mask=(even < K)[:, None] & rank_ok[None, :], other=0.0)
        a_odd = tl.load(a_ptr + ranks[None, :] * stride_am + (even + 1)[:, None],
                        mask=(even + 1 < K)[:, None] & rank_ok[None, :], other=0.0)
        acc += (tl.dot(x_even, a_even.to(dot_dtype), input_precision="ieee")
                + tl.dot(x_odd, a_odd.to(dot_dtype), input_precision="ieee"))
    else:
        a_t = tl.load(a_ptr + ranks[None, :] * stride_am + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :],
                      other=0.0)
        acc = rank_dot(x, a_t.to(dot_dtype), acc, RANK_PRECISION)
    return acc


@triton.jit
def f2_forward_gemm_kernel(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, seg_ptr, seg_rank_start_ptr, seg_scale_ptr, y_ptr,
                           M, N, K, R, stride_xm, stride_wn, stride_um, stride_bn, stride_ym, scaling,
                           HAS_BIAS: tl.constexpr, SEGMENTED: tl.constexpr, BASE_GEMM: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr,
                           SPLIT_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """F2: Y = X @ W^T + b + s * U @ B^T, one fp32 accumulator, Y rounded and written once.

    W^T[k, n] = W[n, k] and B^T[r, n] = B[n, r]. With BASE_GEMM=False the X @ W^T term is
    skipped (Y = b + s U B^T), for the strategy that lets cuBLAS add the base GEMM afterwards.
    SEGMENTED: several adapters, U compact and each row's term its own adapter's (`operands.Segments`).
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    """
    fused_gemm_tile(x_ptr, stride_xm, w_ptr, stride_wn, w_ptr, w_ptr, 0,
                    u_ptr, stride_um, b_ptr, 1, stride_bn, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                    bias_ptr, y_ptr, stride_ym,
                    M, N, K, R, scaling, 0, 0.0,
                    True, False, HAS_BIAS, False, SEGMENTED, BASE_GEMM, INPUT_PRECISION, SPLIT_RANK, BLOCK_M,
                    BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def f2_forward_gemm_tma_kernel(x_desc, w_desc, bias_ptr, u_ptr, b_ptr, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                               y_desc, M, N, K, R, stride_um, stride_bn, scaling, HAS_BIAS: tl.constexpr,
                               SEGMENTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                               SPLIT_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """F2 on Hopper: `f2_forward_gemm_kernel`'s math as persistent programs with TMA loads and stores.

    x_desc: X [M, K], block [BLOCK_M, BLOCK_K]; w_desc: W [N, K], block [BLOCK_N, BLOCK_K];
    y_desc: Y [M, N], block [BLOCK_M, BLOCK_N]. Grid: (min(SMs, output tiles),).
    """
    fused_gemm_persistent_tma(x_desc, w_desc, u_ptr, stride_um, b_ptr, 1, stride_bn, seg_ptr, seg_rank_start_ptr,
                              seg_scale_ptr, bias_ptr, y_desc, M, N, K, R, scaling, 0, 0.0,
                              True, HAS_BIAS, False, SEGMENTED, INPUT_PRECISION, SPLIT_RANK, BLOCK_M, BLOCK_N,
                              BLOCK_K, GROUP_M)


@triton.jit
def f2_forward_gemm_4bit_kernel(x_ptr, codes_ptr, absmax_ptr, table_ptr, bias_ptr, u_ptr, b_ptr, seg_ptr,
                                seg_rank_start_ptr, seg_scale_ptr, y_ptr, M, N, K, R, stride_xm, stride_um, stride_bn,
                                stride_ym, quant_shift, scaling, HAS_BIAS: tl.constexpr, SEGMENTED: tl.constexpr,
                                INPUT_PRECISION: tl.constexpr, SPLIT_RANK: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr):
    """F2 with a 4-bit base (QLoRA): W [N, K] in bitsandbytes' NF4/FP4 format, dequantized tile by
    tile in registers (`gemm_core.load_weight_tile`), the rest as `f2_forward_gemm_kernel`.

    codes: uint8 [N * K / 2] (two elements a byte, the even one in the high nibble); absmax:
    fp32, one per block of 2**quant_shift consecutive elements; table: fp32 [16] code values.
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    """
    fused_gemm_tile(x_ptr, stride_xm, codes_ptr, K, absmax_ptr, table_ptr, quant_shift,
                    u_ptr, stride_um, b_ptr, 1, stride_bn, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                    bias_ptr, y_ptr, stride_ym,
                    M, N, K, R, scaling, 0, 0.0,
                    True, True, HAS_BIAS, False, SEGMENTED, True, INPUT_PRECISION, SPLIT_RANK, BLOCK_M, BLOCK_N,
                    BLOCK_K, GROUP_M)
