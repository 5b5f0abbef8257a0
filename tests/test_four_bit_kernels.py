"""F2 and B2 over a 4-bit base weight (QLoRA: bitsandbytes' NF4/FP4 format), dequantized in the
kernels' registers: outputs and every gradient against an fp64 reference built from the
dequantized weight (itself checked against bitsandbytes' dequantization and the original
weight), and no dense copy of the weight among the kernels' arguments.

Each case would catch: a wrong nibble order or code table, a scale from the wrong block (K not a
multiple of the blocksize, so blocks straddle rows), double quantization not expanded, the
transpose of W in B2, a dropout mask misplaced, or a launcher that dequantizes W on the host.
"""

import pytest
import torch

from lorakernels import ops
from lorakernels.operands import Adapter, FourBitWeight, GradsNeeded
from lorakernels.ops import specs
from lorakernels.plan import resolve_plan
from tests.utils import DEVICE, assert_close_to_reference, reference_grads

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _quantized(N, K, dtype, quant_type, blocksize, nested):
    """(codes, QuantState, the weight it quantized), on DEVICE."""
    weight = (torch.randn(N, K) / K**0.5).to(dtype)
    codes, state = bnb_functional.quantize_4bit(weight.cpu(), blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=nested)
    state.absmax, state.code = state.absmax.to(DEVICE), state.code.to(DEVICE)
    if nested:
        state.state2.absmax, state.state2.code = state.state2.absmax.to(DEVICE), state.state2.code.to(DEVICE)
        state.offset = state.offset.to(DEVICE)
    return codes.to(DEVICE), state, weight.to(DEVICE)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_reads_bitsandbytes_layout(quant_type, nested):
    """Where each block lies within a row, bitsandbytes' own dequantization gives the same bits."""
    codes, state, _ = _quantized(12, 128, torch.bfloat16, quant_type, 64, nested)
    base = FourBitWeight.from_bitsandbytes(codes, state)
    theirs = bnb_functional.dequantize_4bit(codes.cpu(), _on_cpu(state)).to(DEVICE)
    torch.testing.assert_close(base.dequantize(torch.bfloat16), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("K, nested", [(96, False), (80, True)])
def test_blocks_straddling_rows_read_as_bitsandbytes_reads_one_row(K, nested):
    """Blocks are runs of consecutive elements of the flattened weight, rows or not (K = 96 or 80
    with 64-element blocks). bitsandbytes 0.50.2's CPU dequantize_4bit misreads such blocks; quantizing
    the weight as one row of N * K elements gives the same codes and no block straddles a row, so its
    dequantization there is an independent reference: the same bits. And the values stay within half
    the widest gap of the NF4 table times each block's absmax of the weight, as 4-bit quantization must."""
    codes, state, weight = _quantized(8, K, torch.bfloat16, "nf4", 64, nested)
    base = FourBitWeight.from_bitsandbytes(codes, state)
    flat_codes, flat_state = bnb_functional.quantize_4bit(weight.cpu().reshape(1, -1), blocksize=64,
                                                          quant_type="nf4", compress_statistics=nested)
    assert torch.equal(flat_codes.reshape(-1).to(DEVICE), codes.reshape(-1))
    theirs = bnb_functional.dequantize_4bit(flat_codes, flat_state).reshape(8, K).to(DEVICE)
    torch.testing.assert_close(base.dequantize(torch.bfloat16), theirs, rtol=0, atol=0)
    bound = 0.5 * (base.table[1:] - base.table[:-1]).max() * base.with_scales().absmax.repeat_interleave(64)[:8 * K]
    assert ((base.dequantize(torch.float32) - weight.float()).abs().reshape(-1) <= bound + 1e-6).all()


def _on_cpu(state):
    state.absmax, state.code = state.absmax.cpu(), state.code.cpu()
    if state.nested:
        state.state2.absmax, state.state2.code = state.state2.absmax.cpu(), state.state2.code.cpu()
        state.offset = state.offset.cpu()
    return state


CASES = [  # (M, K, N, r, x dtype, adapter dtype, quant type, blocksize, nested, p)
    (37, 96, 40, 8, torch.bfloat16, torch.float32, "nf4", 64, True, 0.1),   # PEFT's QLoRA default
    (20, 80, 24, 4, torch.float16, torch.float16, "nf4", 64, False, 0.0),   # blocks straddle rows (K = 80)
    (9, 64, 33, 40, torch.bfloat16, torch.bfloat16, "fp4", 128, True, 0.3),  # FP4, rank > 32, odd N
    (18, 48, 16, 2, torch.float32, torch.float32, "nf4", 32, False, 0.1),   # fp32 activations
]


@pytest.mark.parametrize("M, K, N, r, dtype, adapter_dtype, quant_type, blocksize, nested, p", CASES)
def test_four_bit_base_matches_fp64_reference(monkeypatch, M, K, N, r, dtype, adapter_dtype, quant_type, blocksize,
                                              nested, p):
    codes, state, _ = _quantized(N, K, dtype, quant_type, blocksize, nested)
    bias = torch.randn(N).to(dtype)
    base = FourBitWeight.from_bitsandbytes(codes, state, bias)
    dense = base.dequantize(dtype)
    x = torch.randn(M, K).to(dtype)
    lora_A = (torch.randn(r, K) / K**0.5).to(adapter_dtype)
    lora_B = torch.randn(N, r).to(adapter_dtype)
    adapter = Adapter(lora_A, lora_B, 0.5, p, seed=1234)
    tensors_seen = []
    launch = specs.KernelSpec.launch

    def spy(spec, *args, **kwargs):
        tensors_seen.extend(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        return launch(spec, *args, **kwargs)

    monkeypatch.setattr(specs.KernelSpec, "launch", spy)
    plan = resolve_plan(DEVICE, "triton", "triton")
    y, u = ops.lora_forward(x, base, adapter, plan)
    dy = torch.randn(M, N).to(dtype)
    dx, da, db = ops.lora_backward(dy, x, u, base, adapter, plan, GradsNeeded())
    assert not [t for t in tensors_seen if t.numel() == N * K and t.is_floating_point()], "a dense W reached a kernel"

    keep = ops.dropout_keep_mask(1234, M, K, p, DEVICE) if p else None
    y64, grads64 = reference_grads(x, dense, bias, lora_A, lora_B, 0.5, keep, p, dy.double(), upcast=True)
    y_lp, grads_lp = reference_grads(x, dense, bias, lora_A, lora_B, 0.5, keep, p, dy, upcast=False)
    assert_close_to_reference("y", y, y64, y_lp, dtype)
    for name, actual, exp64, lowp in zip(("dx", "dA", "dB"), (dx, da, db), grads64, grads_lp):
        assert_close_to_reference(name, actual, exp64, lowp, dtype)


def test_torch_backend_agrees_on_a_four_bit_base():
    codes, state, _ = _quantized(24, 64, torch.bfloat16, "nf4", 64, True)
    base = FourBitWeight.from_bitsandbytes(codes, state)
    x = torch.randn(5, 64).to(torch.bfloat16)
    adapter = Adapter(torch.randn(4, 64) / 8, torch.randn(24, 4), 0.5)  # LoRA term the size of the base term
    y_torch, _ = ops.lora_forward(x, base, adapter, resolve_plan(DEVICE, "torch"))
    y_triton, _ = ops.lora_forward(x, base, adapter, resolve_plan(DEVICE, "triton"))
    # Two bf16 roundings apart at most (a block read with the wrong scale moves y by ~10% of it).
    torch.testing.assert_close(y_triton.float(), y_torch.float(), rtol=0, atol=2**-7 * y_torch.abs().max().item())


@pytest.mark.parametrize("change, message", [
    (dict(blocksize=48), "power of two"),
    (dict(shape=(24, 63)), "even in_features"),
    (dict(codes=torch.zeros(10, dtype=torch.uint8)), "N \\* K / 2"),
    (dict(absmax=torch.zeros(3)), "one value per block"),
])
def test_inconsistent_four_bit_descriptions_are_refused(change, message):
    codes, state, _ = _quantized(24, 64, torch.bfloat16, "nf4", 64, False)
    fields = dict(codes=codes.reshape(-1), absmax=state.absmax.float(), table=state.code.float(), blocksize=64,
                  shape=(24, 64))
    with pytest.raises(ValueError, match=message):
        FourBitWeight(**{**fields, **change})
