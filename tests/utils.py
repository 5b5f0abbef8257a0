"""Test helpers: the shared ones live in lorakernels.testing (the verification script uses them too)."""

import os

import torch

from lorakernels.testing import (  # noqa: F401
    ERROR_FACTOR,
    assert_close_to_reference,
    make_inputs,
    reference_grads,
    replay_keep_mask,
)

# The device the suite runs on (tests/conftest.py): CPU through the interpreter, or CUDA.
DEVICE = torch.device(os.environ.get("LORAKERNELS_TEST_DEVICE", "cpu"))
