"""Test setup: where the kernels run.

By default on CPU tensors through the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton decorates the kernels, so before lorakernels is imported (which then installs
its interpreter fixes, lorakernels._interpreter).

LORAKERNELS_TEST_DEVICE=cuda runs the same tests on a GPU: compiled kernels, and every
tensor a test creates without naming a device lands on the GPU (torch.set_default_device).
Tests that are about the CPU by nature (the interpreter's error path, gloo processes)
name the CPU themselves.
"""

import os

TEST_DEVICE = os.environ.get("LORAKERNELS_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"LORAKERNELS_TEST_DEVICE must be 'cpu' or 'cuda'; got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("LORAKERNELS_TEST_DEVICE=cuda, but torch sees no CUDA device")
    torch.set_default_device("cuda")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
