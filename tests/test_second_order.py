"""Second-order gradients through lora_linear are refused with a clear error, on both backends,
instead of silently dropping the adapter terms (the Triton kernels have no derivative)."""

import pytest
import torch

from lorakernels import lora_linear
from tests.utils import make_inputs

MESSAGE = r"lora_linear does not support second-order gradients"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_penalty_raises_a_clear_error(backend):
    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    leaves = [t.requires_grad_() for t in (x, lora_A, lora_B)]
    y = lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], 0.5, 0.1, backend=backend)
    grad_x, = torch.autograd.grad(y.pow(2).sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        (y.sum() + grad_x.pow(2).sum()).backward()  # a loss plus a gradient penalty


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_create_graph_without_second_derivative_still_gives_first_order_gradients(backend):
    """create_graph=True alone (nothing differentiated twice) keeps working and matches plain backward."""
    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    grads = []
    for create_graph in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)]
        y = lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], 0.5, backend=backend)
        grads.append(torch.autograd.grad(y.pow(2).sum(), leaves, create_graph=create_graph))
    for plain, with_graph in zip(*grads):
        torch.testing.assert_close(with_graph.detach(), plain, rtol=0, atol=0)
