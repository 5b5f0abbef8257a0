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
def load_seed(seed):
    """The dropout seed: an integer argument as it is, or read from the int64 a pointer argument
    points to (a seed drawn on the device, which a captured CUDA graph draws afresh at every
    replay; < 2**31, so the same Philox key as the same integer, in the same 32-bit math)."""
    if seed.dtype.is_ptr():
        seed = tl.load(seed).to(tl.int32)
    return seed


@triton.jit
def dropout_keep(seed, rows, cols, p):
    """Keep-mask tile for the integer `rows` [BM] and `cols` [BK] of an activation.

    Returns a [BM, BK] boolean tile: True where the element is kept (probability 1 - p).
    seed: an integer, or a pointer to it (`load_seed`).
    """
    seed = load_seed(seed)
    col_ctr, row_ctr = tl.broadcast(cols[None, :].to(tl.uint32), rows[:, None].to(tl.uint32))
    bits, _, _, _ = tl.philox(seed, col_ctr, row_ctr, 0, 0)
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def keep_scale(p):
    """1 / (1 - p) in fp32, correctly rounded, as torch's dropout scales by an IEEE 1 / (1 - p).

    `/` on fp32 compiles to the approximate div.full.f32 (up to 2 ulp off: every kept element
    scaled by the same wrong factor); one Newton step with FMAs refines it (correctly rounded for
    every p tried: 3000 random p, from 2 ulp off either side). `tl.math.div_rn` is exact too but
    compiles to a call, around which the accumulator tiles spilled (up to 1.5 KiB of stack on
    sm_90, build gate).
    """
    d = 1.0 - p
    r = 1.0 / d
    return tl.fma(r, tl.fma(-d, r, 1.0), r)


@triton.jit
def load_dropped(x_ptr, rows, cols, stride_xm, mask, seed, p, HAS_DROPOUT: tl.constexpr, out_dtype: tl.constexpr):
    """Load the [BM, BK] tile X[rows, cols] as Xd = X * keep / (1 - p), in `out_dtype`.

    The masking and scaling run in fp32 (exact on a GPU; the interpreter mishandles bf16
    arithmetic), rounded once to `out_dtype`: X's dtype for 16-bit rank-R products, fp32 for
    fp32 ones (Xd then is exact, as PEFT's dropout on an fp32 copy of x). With HAS_DROPOUT=False
    this is a plain masked load.
    """
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_DROPOUT:
        p = tl.cast(p, tl.float32)
        keep = dropout_keep(seed, rows, cols, p)
        x = tl.where(keep, x.to(tl.float32) * keep_scale(p), 0.0)
    return x.to(out_dtype)


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
