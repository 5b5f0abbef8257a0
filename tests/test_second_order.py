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


def _layer_inputs(frozen_A=False):
    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    return x.requires_grad_(), weight, bias, lora_A.requires_grad_(not frozen_A), lora_B.requires_grad_()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("target", ["lora_A", "lora_B", "x", "upstream weight"])
def test_differentiating_a_create_graph_gradient_with_respect_to_anything_raises(backend, target):
    """autograd.grad aimed at one tensor follows only the paths to it: the refusal must sit on
    every such path (a gradient penalty differentiated with respect to the adapters, the input,
    or a layer before), never drop the second-order term silently."""
    z, weight, bias, lora_A, lora_B = _layer_inputs()
    upstream = torch.nn.Linear(24, 24)
    x = upstream(z) if target == "upstream weight" else z
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.1, backend=backend)
    grad_x, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    wrt = {"lora_A": lora_A, "lora_B": lora_B, "x": z, "upstream weight": upstream.weight}[target]
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(grad_x.pow(2).sum() + y.sum(), wrt)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_create_graph_gradient_of_the_adapters_cannot_be_differentiated_either(backend):
    x, weight, bias, lora_A, lora_B = _layer_inputs()
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend=backend)
    grad_A, = torch.autograd.grad(y.pow(2).sum(), lora_A, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(grad_A.pow(2).sum(), lora_B)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_frozen_lora_A_refuses_create_graph_where_x_is_needed(backend):
    """With lora_A frozen x is not kept, so dB's dependence on x could not be guarded: create_graph
    is refused outright there, and keeps working where x needs no gradient."""
    x, weight, bias, lora_A, lora_B = _layer_inputs(frozen_A=True)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(y.pow(2).sum(), (x, lora_B), create_graph=True)
    y = lora_linear(x.detach(), weight, bias, lora_A, lora_B, 0.5, backend=backend)
    grad_B, = torch.autograd.grad(y.pow(2).sum(), lora_B, create_graph=True)
    assert grad_B.shape == lora_B.shape


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_several_adapters_in_a_batch_refuse_it_too(backend):
    from lorakernels import lora_linear_segmented

    x, weight, bias, lora_A, lora_B = _layer_inputs()
    other_A = torch.randn(3, 24, requires_grad=True)
    other_B = torch.randn(20, 3, requires_grad=True)
    rows = torch.tensor([0, 1] * 8)
    y = lora_linear_segmented(x, weight, bias, [(lora_A, lora_B, 0.5), (other_A, other_B, 2.0)], rows,
                              backend=backend)
    grad_x, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(grad_x.pow(2).sum(), other_A)
