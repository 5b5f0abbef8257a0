"""Test setup: run the Triton kernels on CPU tensors through the Triton interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, so before lorakernels
is imported. Set TRITON_INTERPRET=0 in the environment to run the suite on a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


if os.environ["TRITON_INTERPRET"] == "1":
    from lorakernels.testing import patch_interpreter_bf16

    patch_interpreter_bf16()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
