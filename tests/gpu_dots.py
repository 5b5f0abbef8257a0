"""fp32 `tl.dot` as an NVIDIA GPU computes it, for accuracy tests under the Triton interpreter.

The interpreter computes every dot as `np.matmul(a, b) + acc`: the whole K step of a tile summed
apart and added to the accumulator once, whatever `input_precision` says. A GPU does neither:

- "ieee" fp32 dots run on the FMA units, one fused multiply-add per k into the accumulator
  (`acc = fma(a[:, k], b[k, :], acc)` for k in order), each rounded at the accumulator's
  magnitude. What the accumulator starts from therefore decides the error: a kernel that starts
  it from a large term pays roundings at that term's scale on every k, which the interpreter's
  one add per tile hides.
- "tf32" rounds both operands to TF32 (10 mantissa bits, round to nearest, ties away), and the
  tensor cores accumulate exact products in fp32, here one rounding per 8-deep MMA step.
- "tf32x3" splits each operand into a TF32 part and a TF32 remainder and sums three such dots
  (big x small, small x big, big x big; small x small dropped), about 22 bits of each operand.

`gpu_fp32_dots()` patches the interpreter so that fp32 dots follow these rules (16-bit dots, whose
products are exact and which accumulate in fp32 either way, keep the interpreter's arithmetic);
kernel accuracy tests run under it, so a CPU run sees the error a GPU would. It models neither
the tensor cores' truncating alignment inside an MMA nor the order of a split-K reduction.
"""

import contextlib

import numpy as np
import pytest

MMA_K_TF32 = 8  # the K depth of one TF32 tensor-core MMA (m16n8k8)


def _round_tf32(x):
    """fp32 -> TF32 (as fp32): round to nearest, ties away from zero (cvt.rna.tf32.f32)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isfinite(x), rounded, x).astype(np.float32)


def _fma_dot(a, b, acc):
    """acc + a @ b, one fp32 FMA per k in order (the product of two fp32 is exact in fp64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    acc = acc.astype(np.float32)
    for k in range(a.shape[1]):
        acc = (acc.astype(np.float64) + a64[:, k:k + 1] * b64[k:k + 1, :]).astype(np.float32)
    return acc


def _toward_zero(x):
    """fp64 -> fp32 rounded toward zero."""
    nearest = x.astype(np.float32)
    return np.where(np.abs(nearest.astype(np.float64)) > np.abs(x), np.nextafter(nearest, np.float32(0)), nearest)


def _mma_dot(a, b, acc):
    """acc + a @ b for TF32 operands on tensor cores: each 8-deep step's exact products and the
    accumulator summed, then truncated to fp32 (the tensor cores' accumulation rounds toward zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    acc = acc.astype(np.float32)
    for k0 in range(0, a.shape[1], MMA_K_TF32):
        step = a64[:, k0:k0 + MMA_K_TF32] @ b64[k0:k0 + MMA_K_TF32, :]
        acc = _toward_zero(acc.astype(np.float64) + step)
    return acc


def fp32_dot(a, b, acc, input_precision):
    """acc + a @ b for fp32 numpy operands, as a GPU computes it with `input_precision`."""
    if input_precision == "ieee":
        return _fma_dot(a, b, acc)
    a_big, b_big = _round_tf32(a), _round_tf32(b)
    if input_precision == "tf32":
        return _mma_dot(a_big, b_big, acc)
    if input_precision == "tf32x3":
        a_small, b_small = _round_tf32(a - a_big), _round_tf32(b - b_big)
        acc = _mma_dot(a_big, b_small, acc)
        acc = _mma_dot(a_small, b_big, acc)
        return _mma_dot(a_big, b_big, acc)
    raise ValueError(f"unknown input_precision {input_precision!r}")


@contextlib.contextmanager
def gpu_fp32_dots():
    """Within the block, interpreted fp32 `tl.dot`s compute as on a GPU (see the module docstring)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar != tl.float32 or b.dtype.scalar != tl.float32:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        precision = getattr(input_precision, "name", str(input_precision)).lower()
        out = fp32_dot(a.data, b.data, d.data, precision)
        return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original


@pytest.fixture
def gpu_dots():
    """The `gpu_fp32_dots` arithmetic for one test (a no-op without the interpreter: a GPU run
    computes that way already)."""
    from lorakernels.plan import interpreting

    with gpu_fp32_dots() if interpreting() else contextlib.nullcontext():
        yield
