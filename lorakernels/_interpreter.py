"""Fixes to the Triton interpreter (TRITON_INTERPRET=1), so that CPU runs compute as a GPU does.

`apply_interpreter_fixes` installs all of them. `lorakernels` calls it when it is imported (so
processes the package starts itself, workers and subprocesses, get them too), and the
launchers call `ensure_interpreter_fixes` before every interpreted launch (a no-op once the
fixes are in: a safety net should the interpreter's classes be reloaded). Without the
interpreter both do nothing; compiled GPU kernels never take these paths.

1. Index fix (Triton 3.6 with numpy >= 2.4): see `_patch_index`.
2. bf16 fixes (every supported Triton): see `_patch_bf16`. Without them the interpreter
   returns garbage for bf16 products, so the package would compute wrong bf16 results on CPU.

Both patch the interpreter process-wide: other Triton code interpreted in the same process
gets the same (GPU-faithful) arithmetic.
"""

import numpy as np

from lorakernels.plan import interpreting

_applied = False


def apply_interpreter_fixes():
    """Install every interpreter fix when TRITON_INTERPRET=1; otherwise, and once installed, a no-op."""
    global _applied
    if _applied or not interpreting():
        return
    _patch_index()
    _patch_bf16()
    _applied = True


# The launchers' per-launch call: after the first, one global read.
ensure_interpreter_fixes = apply_interpreter_fixes


def _numpy_rejects_array_to_int():
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def _patch_index():
    """Make the interpreter's tensor.__index__ squeeze its one-element array before int().

    Triton's interpreter before 3.7 turns a one-element array into a Python int with
    `int(array)` (loop bounds such as `range(0, K, BLOCK_K)` go through it). NumPy 2.4 made
    that conversion an error, so every kernel with a runtime loop bound fails under
    TRITON_INTERPRET=1 with triton 3.6 and numpy >= 2.4 (upstream triton-lang/triton#9171,
    fixed in later releases by #9172, which squeezes the array first). This does the same,
    only where numpy rejects the old conversion.
    """
    if not _numpy_rejects_array_to_int():
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_lorakernels_index_patch", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    _patch_lang_tensor._lorakernels_index_patch = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def _patch_bf16():
    """Make the interpreter compute bf16 as a GPU does.

    1. `tl.dot` on bf16 returns garbage: the interpreter keeps bf16 tiles as raw uint16
       bit patterns and hands them to np.matmul as integers (upstream triton issue #11584,
       fix declined). Widening the bits to fp32 (bf16 is the top half of an fp32) before
       the matmul gives the exact products a GPU's bf16 tensor cores accumulate in fp32.
    2. fp32 -> bf16 casts truncate the mantissa, where a GPU rounds to nearest even
       (`.to(tl.bfloat16)` lowers to cvt.rn.bf16.f32): half of all stores were one ulp off.
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
