"""Dropout: statistics, consistency between forward and backward, reproducibility.

No golden masks: Philox streams differ between Triton versions. Each test would catch a
mask that is stored instead of regenerated inconsistently, a wrong keep probability, a
tiling-dependent mask, or a seed that torch.manual_seed / checkpointing cannot replay.
"""

import pytest
import torch
import torch.utils.checkpoint as checkpoint

from lorakernels import LoRALinear, lora_linear, ops
from lorakernels.ops import configs
from tests.utils import DEVICE


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropped_fraction_near_p(p):
    M, K = 256, 512  # 131072 draws: the std of the fraction is <= 0.0014, the bound is 5 std
    mask = ops.dropout_keep_mask(1234, M, K, p, DEVICE)
    n = mask.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5
    assert abs((1 - mask.float().mean().item()) - p) < tolerance
    # Rows and columns are not correlated in an obvious way: each row's and column's rate is sane.
    assert (1 - mask.float().mean(1)).sub(p).abs().max() < 0.12
    assert (1 - mask.float().mean(0)).sub(p).abs().max() < 0.15


def test_mask_depends_on_seed_and_not_on_tiling(monkeypatch):
    a = ops.dropout_keep_mask(1, 64, 100, 0.5, DEVICE)
    assert torch.equal(a, ops.dropout_keep_mask(1, 64, 100, 0.5, DEVICE))
    assert not torch.equal(a, ops.dropout_keep_mask(2, 64, 100, 0.5, DEVICE))
    # A different tiling of the same logical (M, K) matrix yields the same mask.
    monkeypatch.setattr(configs, "DROPOUT_MASK_CONFIG", {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4,
                                                          "num_stages": 1})
    assert torch.equal(a, ops.dropout_keep_mask(1, 64, 100, 0.5, DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_and_backward_use_one_mask(backend):
    """With W = 0, B = I and s = 1: y = Xd A^T. With A = I, y = Xd and dx = dy * keep / (1-p):
    the zeros of y and of dx must sit at the same places, and nonzeros scaled by 1/(1-p)."""
    K, p = 40, 0.5
    x = torch.rand(33, K) + 1.0  # strictly positive: a zero in y means dropped
    weight = torch.zeros(K, K)
    lora_A = torch.eye(K).requires_grad_()
    lora_B = torch.eye(K).requires_grad_()
    x.requires_grad_()
    y = lora_linear(x, weight, None, lora_A, lora_B, 1.0, p, backend=backend)
    y.backward(torch.ones_like(y))
    kept_fwd = y.detach() != 0
    kept_bwd = x.grad != 0
    assert 0.3 < kept_fwd.float().mean() < 0.7
    assert torch.equal(kept_fwd, kept_bwd)
    torch.testing.assert_close(y.detach()[kept_fwd], x.detach()[kept_fwd] / (1 - p))
    torch.testing.assert_close(x.grad[kept_bwd], torch.full_like(x.grad[kept_bwd], 1 / (1 - p)))
    # dA = V^T Xd uses the same mask: with dy = 1 and B = I, dA[r, k] = sum_m Xd[m, k].
    torch.testing.assert_close(lora_A.grad, (x.detach() * kept_fwd / (1 - p)).sum(0).expand(K, K), rtol=1e-5,
                               atol=1e-5)


def _dropout_layer(backend):
    layer = LoRALinear(24, 20, r=4, lora_alpha=8, lora_dropout=0.5, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_manual_seed_reproduces_and_calls_differ(backend):
    layer = _dropout_layer(backend)
    x = torch.randn(16, 24)
    torch.manual_seed(3)
    first = layer(x)
    second = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # no dropout in eval mode


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpoint_recompute_replays_the_mask(backend, use_reentrant):
    """Gradients through torch.utils.checkpoint equal the unchecked run bit for bit."""
    layer = _dropout_layer(backend)
    x = torch.randn(2, 9, 24, requires_grad=True)

    def grads(run):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        run().pow(2).sum().backward()
        return [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]

    plain = grads(lambda: layer(x))
    checkpointed = grads(lambda: checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def test_layers_draw_independent_masks():
    first, second = _dropout_layer("triton"), _dropout_layer("triton")
    second.load_state_dict(first.state_dict())
    x = torch.randn(16, 24)
    assert not torch.equal(first(x), second(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seed_and_scalars_stay_on_cpu_under_another_default_device(backend):
    """torch.set_default_device / a device context must not move the seed off the CPU generator:
    the same manual_seed gives the same output and gradients inside a `torch.device("meta")` block."""
    layer = _dropout_layer(backend)
    x = torch.randn(16, 24, requires_grad=True)

    def run():
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = layer(x)
        y.pow(2).sum().backward()
        return [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]

    expected = run()
    with torch.device("meta"):
        actual = run()
    for a, b in zip(actual, expected):
        assert a.device == b.device and torch.equal(a, b)
