"""The one GEMM core of the fused kernels: F2 (forward) and B2 (dX) are this tile program.

    OUT[M, N_OUT] = A[M, K_RED] @ W'[K_RED, N_OUT]          (main loop, BASE_GEMM)
                  + mask((scaling * P[M, R]) @ Q[R, N_OUT])  (rank-R term, HAS_DROPOUT masks it;
                                                             SEGMENTED: each row's own adapter's)
                  + bias[N_OUT]                              (HAS_BIAS)

F2: A = X, W' = W^T, P = U, Q = B^T, scaling s, bias b, no mask  ->  Y.
B2: A = dY, W' = W, P = V (already scaled), Q = A, the dropout mask  ->  dX.

Tile names follow the GEMM: each program owns a BLOCK_M x BLOCK_N tile of OUT (in B2 the
columns are dX's in_features) and steps through the reduction BLOCK_K at a time, so a tile
config means the same in both kernels. Everything is added into fp32 accumulators, and OUT is
rounded and stored once. Every dot runs in A's dtype with INPUT_PRECISION; with SPLIT_RANK (fp32
adapters under 16-bit activations) the rank-R term's fp32 operands are split into high and low
bf16 parts (`tiles.split_dot`), so the term keeps near-fp32 accuracy, as PEFT's fp32 adapters do
(`lorakernels.plan.split_rank_term`).

Where the rank-R term enters depends on the output's precision. 16-bit activations: it is the
accumulator's initial value, so only one BLOCK_M x BLOCK_N fp32 tile is ever live next to the
tensor-core main loop (the output's rounding, 2^-9 or 2^-11, hides any order of the sums). fp32
activations: the main loop accumulates from zero and takes the bias (as cuBLAS's addmm does),
then the rank-R term follows: in F2 onto the same accumulator (a second tile spilled 8-48 B in
F2's fp32 tiles, build gate), in B2 in a second tile, masked alone with dropout, and added once
(that tile is live only after the main loop; accumulated in place, B2's segmented term spilled
16 B on sm_80). On a GPU an fp32 "ieee" dot is one FMA per k into the accumulator, rounded at
the accumulator's magnitude: started from the rank-R term, each of the K steps rounded at the
scale of the whole output. fp32 layers failed their fp64 bounds on the H200; tests/gpu_dots.py's
model of that arithmetic reproduces it on the CPU (y 3-5x PEFT's error, dX 2-3x), which the
interpreter's one add per K step hid.

How the weight is stored is `load_weight_tile`'s business alone (`load_weight_tile_tma` on
the TMA path; the base-weight seam, see `lorakernels.operands`): the main loop asks it for a
[BLOCK_K, BLOCK_N] tile of W' (W^T in F2, W in B2) in the dot's dtype.

Two tile programs share the prologue (`rank_term_tile`) and epilogue (`add_bias`):
`fused_gemm_tile` (one program per output tile, masked pointer loads: any GPU, any layout)
and `fused_gemm_persistent_tma` (Hopper: persistent programs, TMA tensor descriptors).
"""

import triton
import triton.language as tl

from lorakernels.kernels.dropout import dropout_keep, keep_scale
from lorakernels.kernels.tiles import grouped_tile, low_rank_tile, segmented_low_rank_tile


@triton.jit
def dequantize_4bit(codes_ptr, absmax_ptr, table_ptr, offs, mask, quant_shift):
    """W's elements at flat offsets `offs` from bitsandbytes' 4-bit format, in fp32: byte offs // 2
    of the packed codes holds element offs in its high nibble when offs is even, its low nibble
    when odd; the value is table[nibble] (NF4 or FP4 code values) times the absmax of its block
    of 2**quant_shift consecutive elements (bitsandbytes' blocksizes are powers of two)."""
    packed = tl.load(codes_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs & 1) == 0, packed >> 4, packed & 0xF)
    scale = tl.load(absmax_ptr + (offs >> quant_shift), mask=mask, other=0.0)
    return tl.load(table_ptr + nibble) * scale


@triton.jit
def load_weight_tile(w_ptr, stride_wn, red, outs, red_ok, out_ok, scale_ptr, table_ptr, quant_shift,
                     REDUCE_OVER_K: tl.constexpr, WEIGHT_4BIT: tl.constexpr, dot_dtype: tl.constexpr):
    """The [len(red), len(outs)] tile W'[red, outs] of the GEMM's right operand, read from the
    frozen weight W [N, K] (row stride stride_wn, unit column stride), in `dot_dtype`.

    REDUCE_OVER_K (F2, X @ W^T): W' = W^T, element (i, j) is W[outs[j], red[i]]; otherwise
    (B2, dY @ W): W' = W, element (i, j) is W[red[i], outs[j]]. Both address W as
    row * stride_wn + column with the strided term first: writing F2's as red + outs * stride_wn
    cost B2 up to 70 registers more on sm_80 (build gate), for no other change.
    WEIGHT_4BIT=False: W is dense (w_ptr: its elements). WEIGHT_4BIT: W is in bitsandbytes' 4-bit
    format (w_ptr: the packed codes, stride_wn = K; scale_ptr: fp32 absmax per block of
    2**quant_shift elements; table_ptr: the 16 code values), dequantized here, in registers:
    no dense copy of W exists anywhere.
    """
    mask = red_ok[:, None] & out_ok[None, :]
    if WEIGHT_4BIT:
        # 32-bit flat offsets (the launcher checks N * K < 2**31): the dequantization's gathers
        # need a register per element of the tile for them.
        if REDUCE_OVER_K:
            offs = outs.to(tl.int32)[None, :] * stride_wn + red.to(tl.int32)[:, None]
        else:
            offs = red.to(tl.int32)[:, None] * stride_wn + outs.to(tl.int32)[None, :]
        w = dequantize_4bit(w_ptr, scale_ptr, table_ptr, offs, mask, quant_shift).to(dot_dtype)
    else:
        if REDUCE_OVER_K:
            offs = outs[None, :] * stride_wn + red[:, None]
        else:
            offs = red[:, None] * stride_wn + outs[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    return w


@triton.jit
def gemm_main_loop(acc, a_ptr, stride_am, w_ptr, stride_wn, scale_ptr, table_ptr, quant_shift, rows, outs, row_ok,
                   out_ok, K_RED, REDUCE_OVER_K: tl.constexpr, WEIGHT_4BIT: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rows, :] @ W'[:, outs], BLOCK_K reduction steps at a time, masked at the edges."""
    for k0 in range(0, K_RED, BLOCK_K):
        red = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        red_ok = red < K_RED
        a = tl.load(a_ptr + rows[:, None] * stride_am + red[None, :], mask=row_ok[:, None] & red_ok[None, :],
                    other=0.0)
        w = load_weight_tile(w_ptr, stride_wn, red, outs, red_ok, out_ok, scale_ptr, table_ptr, quant_shift,
                             REDUCE_OVER_K, WEIGHT_4BIT, a_ptr.dtype.element_ty)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def rank_term_tile(p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr, seg_scale_ptr, rows,
                   out0, outs, row_ok, out_ok, R, scaling, seed, p, dot_dtype: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   SEGMENTED: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_RANK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rank-R term of one output tile in a tile of its own, dropout-masked with HAS_DROPOUT
    (B2: the mask of X's element (row, column) regenerated from the seed).
    outs: out0 + tl.arange(0, BLOCK_N), out0 a multiple of BLOCK_N (hence of 4, `dropout_keep`)."""
    acc = add_rank_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), p_ptr, stride_pm, q_ptr, stride_qr, stride_qc,
                        seg_ptr, seg_rank_start_ptr, seg_scale_ptr, rows, outs, row_ok, out_ok, R, scaling,
                        dot_dtype, SEGMENTED, INPUT_PRECISION, SPLIT_RANK)
    if HAS_DROPOUT:
        p = tl.cast(p, tl.float32)
        keep = dropout_keep(seed, rows, out0, p, BLOCK_N)
        acc = tl.where(keep, acc * keep_scale(p), 0.0)
    return acc


@triton.jit
def add_rank_term(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                  rows, outs, row_ok, out_ok, R, scaling, dot_dtype: tl.constexpr, SEGMENTED: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, SPLIT_RANK: tl.constexpr):
    """acc + the unmasked rank-R term, accumulated onto acc. SEGMENTED: several adapters, each
    row's own (`tiles.segmented_low_rank_tile`)."""
    if SEGMENTED:
        acc = segmented_low_rank_tile(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, rows, outs, row_ok, out_ok,
                                      seg_ptr, seg_rank_start_ptr, seg_scale_ptr, tl.cast(scaling, tl.float32),
                                      dot_dtype, INPUT_PRECISION, SPLIT_RANK)
    else:
        acc = low_rank_tile(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, rows, outs, row_ok, out_ok, R,
                            tl.cast(scaling, tl.float32), dot_dtype, INPUT_PRECISION, SPLIT_RANK)
    return acc


@triton.jit
def add_bias(acc, bias_ptr, outs, out_ok, HAS_BIAS: tl.constexpr):
    """The epilogue's bias, added in fp32 before the one rounding of the output."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs, mask=out_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc


@triton.jit
def fused_gemm_tile(a_ptr, stride_am, w_ptr, stride_wn, scale_ptr, table_ptr, quant_shift,
                    p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr, seg_scale_ptr,
                    bias_ptr, out_ptr, stride_om,
                    M, N_OUT, K_RED, R, scaling, seed, p,
                    REDUCE_OVER_K: tl.constexpr, WEIGHT_4BIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, SEGMENTED: tl.constexpr, BASE_GEMM: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr,
                    SPLIT_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """One output tile of OUT (see the module docstring), for program id 0 in grouped order,
    with masked pointer loads (the path for every GPU and every layout).

    With BASE_GEMM=False the main loop is skipped (OUT = rank-R term + bias), for the strategy
    that lets cuBLAS add the frozen GEMM afterwards (`out.addmm_(...)`).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N_OUT, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    out0 = pid_n.to(tl.int64) * BLOCK_N
    outs = out0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < N_OUT
    if a_ptr.dtype.element_ty == tl.float32:
        # fp32 output: the main loop from zero and the bias, then the rank-R term (see the module
        # docstring).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if BASE_GEMM:
            acc = gemm_main_loop(acc, a_ptr, stride_am, w_ptr, stride_wn, scale_ptr, table_ptr, quant_shift, rows,
                                 outs, row_ok, out_ok, K_RED, REDUCE_OVER_K, WEIGHT_4BIT, INPUT_PRECISION, BLOCK_K)
        acc = add_bias(acc, bias_ptr, outs, out_ok, HAS_BIAS)
        if REDUCE_OVER_K:  # F2: onto the accumulator
            acc = add_rank_term(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr,
                                seg_scale_ptr, rows, outs, row_ok, out_ok, R, scaling, tl.float32, SEGMENTED,
                                INPUT_PRECISION, SPLIT_RANK)
        else:  # B2: in a tile of its own, which the dropout mask applies to
            acc += rank_term_tile(p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr,
                                  seg_scale_ptr, rows, out0, outs, row_ok, out_ok, R, scaling, seed, p, tl.float32,
                                  HAS_DROPOUT, SEGMENTED, INPUT_PRECISION, SPLIT_RANK, BLOCK_M, BLOCK_N)
    else:
        acc = rank_term_tile(p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr,
                             seg_scale_ptr, rows, out0, outs, row_ok, out_ok, R, scaling, seed, p,
                             a_ptr.dtype.element_ty, HAS_DROPOUT, SEGMENTED, INPUT_PRECISION, SPLIT_RANK, BLOCK_M,
                             BLOCK_N)
        if BASE_GEMM:
            acc = gemm_main_loop(acc, a_ptr, stride_am, w_ptr, stride_wn, scale_ptr, table_ptr, quant_shift, rows,
                                 outs, row_ok, out_ok, K_RED, REDUCE_OVER_K, WEIGHT_4BIT, INPUT_PRECISION, BLOCK_K)
        acc = add_bias(acc, bias_ptr, outs, out_ok, HAS_BIAS)
    tl.store(out_ptr + rows[:, None] * stride_om + outs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def load_weight_tile_tma(w_desc, red0, out0, REDUCE_OVER_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile W'[red0:, out0:] through a tensor descriptor of the dense W [N, K]
    (the TMA path's `load_weight_tile`): F2 reads a [BLOCK_N, BLOCK_K] block of W and hands its
    transpose to the dot (wgmma reads it from shared memory as is); B2 reads W's block directly."""
    if REDUCE_OVER_K:
        w = w_desc.load([out0, red0]).T
    else:
        w = w_desc.load([red0, out0])
    return w


@triton.jit
def fused_gemm_persistent_tma(a_desc, w_desc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr,
                              seg_rank_start_ptr, seg_scale_ptr, bias_ptr, out_desc, M, N_OUT, K_RED, R, scaling, seed,
                              p, REDUCE_OVER_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                              SEGMENTED: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_RANK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    """The same tile program over every output tile, for Hopper: persistent programs (the grid is
    at most one program per SM, each loops over output tiles in grouped order), A, W and OUT
    through TMA tensor descriptors. The main loop has no masks and no address arithmetic: TMA
    fills out-of-bounds elements with zeros and clips the store, so ragged M, N_OUT and K_RED
    need no tail code; coordinates are 32-bit tile offsets, the 64-bit addressing is the
    descriptor's. The rank-R operands, the mask and the bias stay pointer loads (small). Always
    with the base GEMM: the cuBLAS strategy takes the pointer path for its rank-R-only launch."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        outs = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        out_ok = outs < N_OUT
        acc = rank_term_tile(p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, seg_ptr, seg_rank_start_ptr,
                             seg_scale_ptr, rows, off_n, outs, row_ok, out_ok, R, scaling, seed, p, a_desc.dtype,
                             HAS_DROPOUT, SEGMENTED, INPUT_PRECISION, SPLIT_RANK, BLOCK_M, BLOCK_N)
        for k0 in range(0, K_RED, BLOCK_K):
            a = a_desc.load([off_m, k0])
            acc = tl.dot(a, load_weight_tile_tma(w_desc, k0, off_n, REDUCE_OVER_K), acc,
                         input_precision=INPUT_PRECISION)
        acc = add_bias(acc, bias_ptr, outs, out_ok, HAS_BIAS)
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))
