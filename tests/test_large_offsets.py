"""Element offsets past 2^31: the kernels' index math must be int64.

x and weight are strided views whose rows sit gigabytes apart in one large allocation
that is mostly never touched (the OS maps pages lazily). With int32 offset arithmetic
the interpreter (numpy int32) wraps around and reads the wrong rows or faults; the
outputs and gradients would not match the reference.
"""

import pytest
import torch

from lorakernels import lora_linear
from lorakernels.ops import specs
from tests.utils import assert_close_to_reference, reference_grads, replay_keep_mask

ROW_STRIDE = 2**30 + 16  # elements between consecutive rows: row 2 starts past 2^31


def spread_rows(rows, cols, dtype):
    """A (rows, cols) view with ROW_STRIDE elements between rows; only its rows are ever written."""
    storage = torch.empty((rows - 1) * ROW_STRIDE + cols, dtype=dtype)
    view = storage.as_strided((rows, cols), (ROW_STRIDE, 1))
    view.copy_(torch.randn(rows, cols).to(dtype))
    return view


@pytest.mark.parametrize("base_gemm", ["triton", "triton-tma"])  # triton-tma: descriptors hold the addresses
def test_offsets_beyond_int32(base_gemm, monkeypatch):
    # N = 8: y's and dY's rows are 16 bytes, so TMA can address every operand and triton-tma runs the
    # TMA kernels (checked below), not the pointer kernels again.
    M, K, N, r, p, dtype = 4, 40, 8, 4, 0.1, torch.float16
    launched = []
    launch = specs.KernelSpec.launch
    monkeypatch.setattr(specs.KernelSpec, "launch",
                        lambda spec, *args, **kwargs: launched.append(spec.code) or launch(spec, *args, **kwargs))
    x = spread_rows(M, K, dtype).requires_grad_()
    weight = spread_rows(N, K, dtype)
    assert (M - 1) * x.stride(0) > 2**31 and (N - 1) * weight.stride(0) > 2**31
    bias = torch.randn(N).to(dtype)
    lora_A = (torch.randn(r, K) / K**0.5).requires_grad_()
    lora_B = torch.randn(N, r).requires_grad_()

    rng_state = torch.get_rng_state()
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, backend="triton", base_gemm=base_gemm)
    keep = replay_keep_mask(rng_state, M, K, p, "triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    gemms = {"F2-TMA", "B2-TMA"} if base_gemm == "triton-tma" else {"F2", "B2"}
    assert gemms <= set(launched), launched

    dense_w = weight.contiguous()
    y64, grads64 = reference_grads(x.contiguous(), dense_w, bias, lora_A, lora_B, 0.5, keep, p, dy.double(), True)
    y_lp, grads_lp = reference_grads(x.contiguous(), dense_w, bias, lora_A, lora_B, 0.5, keep, p, dy, False)
    assert_close_to_reference("y", y.detach(), y64, y_lp, dtype)
    for name, actual, exp64, lowp in zip(("dx", "dA", "dB"), (x.grad, lora_A.grad, lora_B.grad), grads64, grads_lp):
        assert_close_to_reference(name, actual, exp64, lowp, dtype)
