"""What autograd keeps for backward: x, U (fp32, M x R) and the parameters; nothing else (the
seed, scaling and p are Python numbers on the autograd context; under torch.compile the custom
op saves them as one float64 CPU tensor of 3 elements, 24 bytes: tests/test_compile.py).

Counted with torch.autograd.graph.saved_tensors_hooks. This catches a stored dropout
mask, a stored dropped input Xd, an fp32 copy of x, or a saved output.
"""

import pytest
import torch

from lorakernels import LoRALinear, lora_linear_ref
from lorakernels.ops import torch_keep_mask
from lorakernels.testing import saved_activation_bytes
from tests.utils import DEVICE


CASES = [  # (x dtype, adapter dtype, p)
    (torch.float32, torch.float32, 0.0),
    (torch.float32, torch.float32, 0.1),
    (torch.bfloat16, torch.bfloat16, 0.1),
    (torch.bfloat16, torch.float32, 0.0),
    (torch.bfloat16, torch.float32, 0.1),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, adapter_dtype, p", CASES, ids=str)
def test_saves_only_x_and_u(dtype, adapter_dtype, p, backend):
    M, K, N, r = 64, 96, 80, 8
    layer = LoRALinear(K, N, r=r, lora_dropout=p, dtype=dtype, adapter_dtype=adapter_dtype, backend=backend)
    x = torch.randn(4, M // 4, K, dtype=dtype, requires_grad=True)
    saved, y = saved_activation_bytes(lambda: layer(x), list(layer.parameters()))
    minimal = M * K * x.element_size() + M * r * 4  # x itself, U in fp32
    assert saved == minimal, f"saved {saved} bytes, expected x + U = {minimal}"
    y.sum().backward()  # and backward still works from what was saved
    assert layer.lora_A.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype, adapter_dtype, p", CASES, ids=str)
def test_peft_style_reference_saves_more(dtype, adapter_dtype, p):
    """The unfused PEFT-style path (the reference) keeps more whenever there is dropout or a dtype cast
    (its Xd, its mask, its fp32 copy of x); with neither, it keeps exactly x and U too."""
    M, K, N, r = 64, 96, 80, 8
    layer = LoRALinear(K, N, r=r, lora_dropout=p, dtype=dtype, adapter_dtype=adapter_dtype)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    keep = torch_keep_mask(0, M, K, p, DEVICE) if p else None
    saved, _ = saved_activation_bytes(
        lambda: lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, keep, p),
        list(layer.parameters()))
    minimal = M * K * x.element_size() + M * r * 4
    if p == 0 and dtype == adapter_dtype:
        assert saved == minimal
    else:
        assert saved > minimal, f"saved {saved} bytes, minimal {minimal}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_frozen_adapter_halves_save_less(backend):
    """A frozen lora_A (LoRA-FA style) needs no x in backward; a frozen lora_B needs no U."""
    M, K, N, r = 64, 96, 80, 8
    layer = LoRALinear(K, N, r=r, lora_dropout=0.1, backend=backend)
    x = torch.randn(M, K, requires_grad=True)
    layer.lora_A.requires_grad_(False)
    saved, y = saved_activation_bytes(lambda: layer(x), list(layer.parameters()))
    assert saved == M * r * 4, f"saved {saved} bytes with lora_A frozen; expected U alone"
    y.sum().backward()
    assert layer.lora_B.grad is not None and x.grad is not None and layer.lora_A.grad is None

    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(False)
    saved, y = saved_activation_bytes(lambda: layer(x), list(layer.parameters()))
    assert saved == M * K * 4, f"saved {saved} bytes with lora_B frozen; expected x alone"
    y.sum().backward()
    assert layer.lora_A.grad is not None
