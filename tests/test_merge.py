"""Merge kernel and LoRALinear.merge/unmerge.

Would catch: a wrong or missing scaling, transposed B/A, masked-edge bugs on shapes that are
not tile multiples, more than one rounding step, drift across merge/unmerge cycles, training
through merged weights.
"""

import pytest
import torch

from lorakernels import LoRALinear, ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ulp(t):
    """Distance from |t| to the next representable value of t's dtype, elementwise."""
    t = t.abs()
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).double()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("r", [1, 5, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter_dtype", ["same", torch.float32], ids=["adapters-same", "adapters-fp32"])
def test_merge_within_one_ulp_of_fp64(dtype, adapter_dtype, r, backend):
    N, K = 70, 90  # not multiples of any tile
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    weight = torch.randn(N, K).to(dtype)
    lora_A = (torch.randn(r, K) / r**0.5).to(adapter_dtype)
    lora_B = torch.randn(N, r).to(adapter_dtype)
    exact = weight.double() + 0.75 * (lora_B.double() @ lora_A.double())
    rounded = exact.to(dtype)
    merged = ops.lora_merge(weight, lora_A, lora_B, 0.75, backend=backend)
    err = (merged.double() - exact).abs()
    assert (err <= ulp(rounded) + 1e-300).all(), f"max error {err.max():.3e}, {int((err > ulp(rounded)).sum())} over 1 ulp"
    assert (merged == rounded).float().mean() > 0.99  # nearly all are the correctly rounded value
    again = ops.lora_merge(merged, lora_A, lora_B, 0.75, subtract=True, backend=backend)
    assert ((again.double() - weight.double()).abs() <= 2 * ulp(weight) + ulp(rounded)).all()


def test_merge_in_place_and_empty():
    weight = torch.randn(33, 20)
    lora_A, lora_B = torch.randn(3, 20), torch.randn(33, 3)
    expected = (weight.double() + 2.0 * lora_B.double() @ lora_A.double()).float()
    out = ops.lora_merge(weight, lora_A, lora_B, 2.0, out=weight)
    assert out is weight and torch.equal(weight, expected)
    empty = torch.empty(0, 20)
    assert ops.lora_merge(empty, lora_A, torch.empty(0, 3), 2.0).shape == (0, 20)


def _trained_layer(dtype, backend="triton"):
    layer = LoRALinear(40, 24, r=4, lora_alpha=8, dtype=dtype, adapter_dtype=torch.float32, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merged_forward_is_the_plain_gemm_and_matches(dtype):
    layer = _trained_layer(dtype).eval()
    x = torch.randn(5, 40, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    assert torch.equal(merged, torch.nn.functional.linear(x, layer.weight, layer.bias))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(merged, unmerged, **tol)


def test_training_while_merged_is_refused():
    layer = _trained_layer(torch.float32)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        layer(torch.randn(2, 40))
    with torch.no_grad():
        layer(torch.randn(2, 40))  # inference is fine
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_hundred_merge_unmerge_cycles_leave_the_base_bitwise_identical(dtype, backend):
    layer = _trained_layer(dtype, backend)
    original = layer.weight.detach().clone()
    for _ in range(100):
        layer.merge()
        assert not torch.equal(layer.weight, original)
        layer.unmerge()
        with torch.no_grad():  # an optimizer step on the adapter between cycles
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.1)
    assert torch.equal(layer.weight, original)


def test_unmerge_without_a_kept_copy_subtracts():
    """keep_original=False saves the copy; unmerge then subtracts, within rounding of the original."""
    layer = _trained_layer(torch.bfloat16)
    original = layer.weight.detach().clone()
    layer.merge(keep_original=False)
    merged = layer.weight.detach().clone()
    layer.unmerge()
    err = (layer.weight.double() - original.double()).abs()
    # Two roundings: the merged value's (half an ulp of it) and the restored value's (half of its).
    assert (err <= 0.5 * ulp(merged) + 0.5 * ulp(original) + 1e-300).all()
