"""Compatibility with the Triton versions the package supports (3.6 through 3.9).

Triton's interpreter before 3.7 turns a one-element array into a Python int with
`int(array)` (loop bounds such as `range(0, K, BLOCK_K)` go through it). NumPy 2.4 made
that conversion an error, so every kernel with a runtime loop bound fails under
TRITON_INTERPRET=1 with triton 3.6 and numpy >= 2.4 (upstream triton-lang/triton#9171,
fixed in later releases by #9172, which squeezes the array first). The fix below does the
same, only under the interpreter and only where numpy rejects the old conversion. It runs
when lorakernels is imported, so that processes the package starts itself (workers,
subprocesses) get it too. Compiled GPU kernels never take this path.
"""

import os

import numpy as np


def _numpy_rejects_array_to_int():
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def patch_interpreter_index():
    """Make the interpreter's tensor.__index__ squeeze its one-element array before int()."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not _numpy_rejects_array_to_int():
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
