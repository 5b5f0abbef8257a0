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


def run(model, x):
    """Output and every gradient (x and the trainable parameters) of sum(y^2), for comparing two
    models (PEFT's and a patched or converted one) on one input."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"y": y.detach(), "dx": x.grad, **grads}


def assert_same(actual, expected, tol=1e-5):
    """`run` results: same keys and dtypes; values within `tol` of each tensor's largest magnitude
    (fp32: a few ulps of the largest value, whatever the summation order)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(actual[key], expected[key], rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{key}: {m}")
