"""Philox dropout keep-mask, regenerated wherever it is needed, never stored.

The mask of element (m, k) of an activation depends only on the seed and the logical
position (m, k) (as in Triton tutorial 06, low-memory dropout), so every kernel that
regenerates it agrees with every other, whatever its tiling. One Philox4x32-10 call gives
four 32-bit words and each word decides one element, as aten's fused dropout does with
`curand_uniform4`: the call with counter (k // 4, m, 0, 0) decides the elements
(m, 4 (k // 4) + j), j = 0..3, element j by word j. An element is kept when the uniform float
of its own 32-bit word (`tl.uint_to_uniform_float`) is >= p: the same test as with one call
per element, a quarter of the Philox calls. The counter words are 32-bit: unique for up to
2^32 rows and 2^34 columns, with none of the 64-bit arithmetic (and registers) that a flat
int64 offset m * K + k would need.
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
def dropout_keep(seed, rows, col0, p, BLOCK_COLS: tl.constexpr):
    """Keep-mask tile for the integer `rows` [BM] and the columns col0 .. col0 + BLOCK_COLS - 1.

    Returns a [BM, BLOCK_COLS] boolean tile: True where the element is kept (probability 1 - p).
    seed: an integer, or a pointer to it (`load_seed`).

    col0 must be a multiple of 4 (BLOCK_COLS is one): the group k // 4 and the word k % 4 of
    column col0 + i are taken as col0 // 4 + i // 4 and i % 4. Every caller's column tiles start
    at a multiple of their block (>= 16, tl.dot's minimum), so this holds; a tile starting
    elsewhere would get the words of other elements, silently.

    The tile is written per element (each element's call, then its word) in whatever layout the
    caller's tile has, so no layout conversion is needed. i // 4 and i % 4 are constants of each
    register of a thread, so the elements of one group that a thread holds call Philox with
    identical arguments and the compiler keeps one call. A thread that holds 4 consecutive
    columns (the tiles F1, B3 and the mask kernel load 16 bytes at a time) pays one call per 4
    elements; one that holds column pairs (B2's MMA accumulator tile on sm_80 and sm_90, B3's
    16 x 32 fp32 tile) one per 2. sm_90 builds, PTX mul.hi.u32 per element and thread
    (Philox-10: 20 per call, fewer where rows or columns repeat): 14 -> 4 in F1 and B3, 14.5 -> 8
    in B2. A [BM, BLOCK_COLS // 4] tile of calls interleaved with tl.join and tl.reshape costs
    the same in F1, but B2's epilogue then converted the mask to the accumulator's layout
    through shared memory and B3 spilled 16 B on sm_90.
    """
    tl.static_assert(BLOCK_COLS % 4 == 0, "dropout_keep: BLOCK_COLS must be a multiple of 4")
    seed = load_seed(seed)
    offs = tl.arange(0, BLOCK_COLS).to(tl.uint32)
    groups = tl.cast(col0 // 4, tl.uint32) + (offs >> 2)
    word = (offs & 3)[None, :]
    group_ctr, row_ctr = tl.broadcast(groups[None, :], rows[:, None].to(tl.uint32))
    w0, w1, w2, w3 = tl.philox(seed, group_ctr, row_ctr, 0, 0)
    bits = tl.where(word < 2, tl.where(word == 0, w0, w1), tl.where(word == 2, w2, w3))
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
def load_dropped(x_ptr, rows, col0, cols, stride_xm, mask, seed, p, HAS_DROPOUT: tl.constexpr,
                 out_dtype: tl.constexpr):
    """Load the [BM, BK] tile X[rows, cols] as Xd = X * keep / (1 - p), in `out_dtype`.

    cols: col0 + tl.arange(0, BK), col0 a multiple of 4 (`dropout_keep`).

    The masking and scaling run in fp32 (exact on a GPU; the interpreter mishandles bf16
    arithmetic), rounded once to `out_dtype`: X's dtype for 16-bit rank-R products, fp32 for
    fp32 ones (Xd then is exact, as PEFT's dropout on an fp32 copy of x). With HAS_DROPOUT=False
    this is a plain masked load.
    """
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_DROPOUT:
        p = tl.cast(p, tl.float32)
        keep = dropout_keep(seed, rows, col0, p, cols.shape[0])
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
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, col0, tl.cast(p, tl.float32), BLOCK_K)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], keep.to(tl.int8), mask=in_bounds)
