"""The one GEMM core of the fused kernels: F2 (forward) and B2 (dX) are this tile program.

    OUT[M, N_OUT] = A[M, K_RED] @ W'[K_RED, N_OUT]          (main loop, BASE_GEMM)
                  + mask((scaling * P[M, R]) @ Q[R, N_OUT])  (rank-R term, HAS_DROPOUT masks it)
                  + bias[N_OUT]                              (HAS_BIAS)

F2: A = X, W' = W^T, P = U, Q = B^T, scaling s, bias b, no mask  ->  Y.
B2: A = dY, W' = W, P = V (already scaled), Q = A, the dropout mask  ->  dX.

Tile names follow the GEMM: each program owns a BLOCK_M x BLOCK_N tile of OUT (in B2 the
columns are dX's in_features) and steps through the reduction BLOCK_K at a time, so a tile
config means the same in both kernels. Everything is added into one fp32 accumulator, which
is rounded and stored once. The rank-R term comes first: it is the accumulator's initial
value, so only one BLOCK_M x BLOCK_N fp32 tile is ever live. Every dot runs in A's dtype with
INPUT_PRECISION; with SPLIT_RANK (fp32 adapters under 16-bit activations) the rank-R term's
fp32 operands are split into high and low bf16 parts (`tiles.split_dot`), so the term keeps
near-fp32 accuracy, as PEFT's fp32 adapters do (`lorakernels.plan.split_rank_term`).

How the weight is stored is `load_weight_tile`'s business alone (the base-weight seam, see
`lorakernels.operands`): the main loop asks it for a [BLOCK_K, BLOCK_N] tile of W' (W^T in
F2, W in B2) in the dot's dtype.
"""

import triton
import triton.language as tl

from lorakernels.kernels.dropout import dropout_keep
from lorakernels.kernels.tiles import grouped_tile, low_rank_tile


@triton.jit
def load_weight_tile(w_ptr, stride_wn, red, outs, red_ok, out_ok, REDUCE_OVER_K: tl.constexpr):
    """The [len(red), len(outs)] tile W'[red, outs] of the GEMM's right operand, read from the
    dense frozen weight W [N, K] (row stride stride_wn, unit column stride).

    REDUCE_OVER_K (F2, X @ W^T): W' = W^T, element (i, j) is W[outs[j], red[i]]; otherwise
    (B2, dY @ W): W' = W, element (i, j) is W[red[i], outs[j]]. Both address W as
    row * stride_wn + column with the strided term first: writing F2's as red + outs * stride_wn
    cost B2 up to 70 registers more on sm_80 (build gate), for no other change.
    """
    mask = red_ok[:, None] & out_ok[None, :]
    if REDUCE_OVER_K:
        return tl.load(w_ptr + outs[None, :] * stride_wn + red[:, None], mask=mask, other=0.0)
    return tl.load(w_ptr + red[:, None] * stride_wn + outs[None, :], mask=mask, other=0.0)


@triton.jit
def gemm_main_loop(acc, a_ptr, stride_am, w_ptr, stride_wn, rows, outs, row_ok, out_ok, K_RED,
                   REDUCE_OVER_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rows, :] @ W'[:, outs], BLOCK_K reduction steps at a time, masked at the edges."""
    for k0 in range(0, K_RED, BLOCK_K):
        red = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        red_ok = red < K_RED
        a = tl.load(a_ptr + rows[:, None] * stride_am + red[None, :], mask=row_ok[:, None] & red_ok[None, :],
                    other=0.0)
        w = load_weight_tile(w_ptr, stride_wn, red, outs, red_ok, out_ok, REDUCE_OVER_K)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def fused_gemm_tile(a_ptr, stride_am, w_ptr, stride_wn,
                    p_ptr, stride_pm, q_ptr, stride_qr, stride_qc,
                    bias_ptr, out_ptr, stride_om,
                    M, N_OUT, K_RED, R, scaling, seed, p,
                    REDUCE_OVER_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    BASE_GEMM: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_RANK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One output tile of OUT (see the module docstring), for program id 0 in grouped order.

    With BASE_GEMM=False the main loop is skipped (OUT = rank-R term + bias), for the strategy
    that lets cuBLAS add the frozen GEMM afterwards (`out.addmm_(...)`).
    """
    dot_dtype = a_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N_OUT, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < N_OUT

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = low_rank_tile(acc, p_ptr, stride_pm, q_ptr, stride_qr, stride_qc, rows, outs, row_ok, out_ok, R,
                        tl.cast(scaling, tl.float32), dot_dtype, INPUT_PRECISION, SPLIT_RANK)
    if HAS_DROPOUT:
        p = tl.cast(p, tl.float32)
        keep = dropout_keep(seed, rows, outs, p)
        acc = tl.where(keep, acc * (1.0 / (1.0 - p)), 0.0)
    if BASE_GEMM:
        acc = gemm_main_loop(acc, a_ptr, stride_am, w_ptr, stride_wn, rows, outs, row_ok, out_ok, K_RED,
                             REDUCE_OVER_K, INPUT_PRECISION, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs, mask=out_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + outs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])
