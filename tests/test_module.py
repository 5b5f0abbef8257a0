"""LoRALinear as a module: construction, sharing, identity at init, trainable set, state_dict."""

import math

import pytest
import torch

from lorakernels import LoRALinear, lora_scaling


def test_from_linear_shares_storage_and_freezes():
    linear = torch.nn.Linear(24, 20)
    layer = LoRALinear.from_linear(linear, r=4, lora_alpha=8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (20, 4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fresh_adapter_is_the_base_layer(dtype, backend):
    """B = 0: the LoRA term adds exactly zero. The torch backend then equals nn.Linear bit for bit;
    the Triton GEMM sums in another order, so it equals itself with A zeroed too, and nn.Linear
    to within rounding."""
    linear = torch.nn.Linear(40, 30, dtype=dtype)
    layer = LoRALinear.from_linear(linear, r=8, lora_dropout=0.1, adapter_dtype=torch.float32, backend=backend)
    x = torch.randn(3, 7, 40, dtype=dtype)
    y = layer(x)
    if backend == "torch":
        assert torch.equal(y, linear(x))
    else:
        with torch.no_grad():
            layer.lora_A.zero_()
        assert torch.equal(y, layer(x))
        torch.testing.assert_close(y, linear(x))


def test_initialization_matches_peft():
    layer = LoRALinear(64, 32, r=16)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.lora_A.std() > 0.4 * bound


def test_scaling_and_rslora():
    assert LoRALinear(8, 8, r=4, lora_alpha=16).scaling == 4.0
    assert LoRALinear(8, 8, r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    assert lora_scaling(16, 32, use_rslora=True) == 8.0


def test_state_dict_keys_and_repr():
    layer = LoRALinear(12, 10, r=2, lora_alpha=4, lora_dropout=0.05)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    text = repr(layer)
    for part in ("in_features=12", "out_features=10", "r=2", "lora_alpha=4", "scaling=2", "lora_dropout=0.05"):
        assert part in text
    assert list(LoRALinear(12, 10, bias=False).state_dict()) == ["weight", "lora_A", "lora_B"]


def test_adapter_dtype_and_output_dtype():
    layer = LoRALinear(16, 8, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert layer(torch.randn(5, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_training_step_reduces_loss():
    """End to end: the adapter learns a low-rank correction of a frozen layer."""
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4, lora_alpha=8)
    target = torch.randn(16, 4) @ torch.randn(4, 32) * 0.3
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    x = torch.randn(64, 32)
    losses = []
    for _ in range(30):
        loss = (layer(x) - (layer.weight.detach() + target).matmul(x.t()).t() - layer.bias.detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_meta_device_construction_forward_backward():
    """Catches a LoRALinear that cannot run where nn.Linear runs on meta tensors (shape and dtype
    propagation, autograd included), built with device="meta", under torch.device("meta") or
    wrapped from a meta Linear."""
    x = torch.empty(3, 5, 24, device="meta", dtype=torch.bfloat16, requires_grad=True)
    expected = torch.nn.Linear(24, 20, device="meta", dtype=torch.bfloat16)(x)
    with torch.device("meta"):
        wrapped = LoRALinear.from_linear(torch.nn.Linear(24, 20, dtype=torch.bfloat16), r=4)
    layers = [LoRALinear(24, 20, r=4, lora_dropout=0.1, device="meta", dtype=torch.bfloat16,
                         adapter_dtype=torch.float32), wrapped]
    for layer in layers:
        assert layer.weight.is_meta and layer.lora_A.is_meta and layer.lora_B.is_meta
        y = layer(x)
        assert y.is_meta and (y.shape, y.dtype) == (expected.shape, expected.dtype)
        y.sum().backward()
        assert x.grad.is_meta and x.grad.shape == x.shape
        for p in (layer.lora_A, layer.lora_B):
            assert p.grad.is_meta and (p.grad.shape, p.grad.dtype) == (p.shape, p.dtype)
        x.grad = None
