"""Philox dropout keep-mask, regenerated wherever it is needed, never stored.

The mask of element (m, k) of an activation depends only on the seed and the logical
position (m, k) (as in Triton tutorial 06, low-memory dropout), so every kernel that
regenerates it agrees with every other, whatever its tiling. The Philox counter is
(k, m, 0, 0) in 32-bit words: unique for up to 2^32 rows and columns, with none of the
64-bit arithmetic (and registers) that a flat int64 offset m * K + k would need.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, p):
    """Keep-mask tile for the integer `rows` [BM] and `cols` [BK] of an activation.

    Returns a [BM, BK] boolean tile: True where the element is kept (probability 1 - p).
    """
    col_ctr, row_ctr = tl.broadcast(cols[None, :].to(tl.uint32), rows[:, None].to(tl.uint32))
    bits, _, _, _ = tl.philox(seed, col_ctr, row_ctr, 0, 0)
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit(do_not_specialize=["seed"])
def dropout_keep_mask_kernel(
    out_ptr,
    M,
    K,
    stride_om,
    seed,
    p,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Materialize the keep-mask as an int8 (M, K) tensor. Test and debugging aid only."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, cols, tl.cast(p, tl.float32))
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], keep.to(tl.int8), mask=in_bounds)
