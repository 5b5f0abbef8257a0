"""Test helpers: the shared ones live in lorakernels.testing (the verification script uses them too)."""

from lorakernels.testing import (  # noqa: F401
    ERROR_FACTOR,
    assert_close_to_reference,
    make_inputs,
    reference_grads,
    replay_keep_mask,
)
