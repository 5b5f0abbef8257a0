"""Philox dropout keep-mask, regenerated wherever it is needed, never stored.

The mask of element (m, k) of an M x K activation depends only on the seed and the
logical index m * K + k (Triton tutorial 06, low-memory dropout), so every kernel that
regenerates it agrees with every other, whatever its tiling. Offsets are int64, which
selects Triton's 64-bit Philox counter: no wrap-around past 2^31 elements.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p):
    """Keep-mask tile for the given int64 `rows` [BM] and `cols` [BK] of an (M, n_cols) matrix.

    Returns a [BM, BK] boolean tile: True where the element is kept (probability 1 - p).
    """
    offsets = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


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
    keep = dropout_keep(seed, rows, cols, K, tl.cast(p, tl.float32))
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], keep.to(tl.int8), mask=in_bounds)
