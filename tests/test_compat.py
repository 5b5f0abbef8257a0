"""Triton 3.6 through 3.9: the interpreter fix for numpy >= 2.4 is in place exactly where needed."""

import pytest

from lorakernels._triton_compat import _numpy_rejects_array_to_int
from tests.utils import DEVICE


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the fix concerns the interpreter only")
def test_interpreter_index_fix_is_installed_where_numpy_needs_it():
    from triton.runtime import interpreter

    installed = getattr(interpreter._patch_lang_tensor, "_lorakernels_index_patch", False)
    assert installed == _numpy_rejects_array_to_int()
