"""Test setup: run the Triton kernels on CPU tensors through the Triton interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, so before lorakernels
is imported. Set TRITON_INTERPRET=0 in the environment to run the suite on a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _patch_interpreter_bf16():
    """Interpreter-only fixes for bf16, so the CPU suite checks bf16 as a GPU computes it.

    1. `tl.dot` on bf16 returns garbage: the interpreter keeps bf16 tiles as raw uint16
       bit patterns and hands them to np.matmul as integers (upstream triton issue #11584,
       fix declined). Widening the bits to fp32 (bf16 is the top half of an fp32) before
       the matmul gives the exact products a GPU's bf16 tensor cores accumulate in fp32.
    2. fp32 -> bf16 casts truncate the mantissa, where a GPU rounds to nearest even
       (`.to(tl.bfloat16)` lowers to cvt.rn.bf16.f32): half of all stores were one ulp off.
    Compiled GPU kernels are untouched.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_lorakernels_bf16_patch", False):
        return
    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def widen(handle):
        if getattr(handle.dtype, "scalar", handle.dtype) != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = 0x7FC0
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._lorakernels_bf16_patch = True


if os.environ["TRITON_INTERPRET"] == "1":
    _patch_interpreter_bf16()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
