"""Merge kernel: W_out = W + s * B @ A, one tiled pass over W.

W: [N, K] (fp32, fp16 or bf16), B: [N, R], A: [R, K] (W's dtype or fp32). Each program
reads one BLOCK_N x BLOCK_K tile of W, adds the rank-R product for that tile and writes
it once: no N x K temporary. The product is accumulated in fp64 (R outer products on the
CUDA cores) and W is added in fp64 too; the result is rounded to fp32 and then to W's dtype
(a 16-bit W can land one ulp from the single-rounded value, in rare double-rounding ties).
Merge is memory-bound (one read and one write of W): the extra precision costs nothing.
`SUBTRACT` computes W - s * B @ A (the unmerge of a lossy merge).
"""

import triton
import triton.language as tl


@triton.jit
def merge_kernel(
    w_ptr,
    b_ptr,
    a_ptr,
    out_ptr,
    N,
    K,
    R,
    stride_wn,
    stride_bn,
    stride_ar,
    stride_on,
    scaling,
    SUBTRACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)). out may alias w (in-place merge)."""
    outs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_ok = outs < N
    col_ok = cols < K
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    for r in range(0, R):
        b = tl.load(b_ptr + outs * stride_bn + r, mask=out_ok, other=0.0).to(tl.float64)
        a = tl.load(a_ptr + r * stride_ar + cols, mask=col_ok, other=0.0).to(tl.float64)
        delta += b[:, None] * a[None, :]
    delta = delta * tl.cast(scaling, tl.float64)
    mask = out_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + outs[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0).to(tl.float64)
    merged = w - delta if SUBTRACT else w + delta
    merged = merged.to(tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + outs[:, None] * stride_on + cols[None, :], merged, mask=mask)
