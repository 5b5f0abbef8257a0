"""Numerics of the fused LoRA linear: outputs and all gradients against an fp64 reference.

Each case would catch: a wrong or missing term (base, bias, LoRA, scaling), masked-edge
bugs (K, N, M not multiples of any block), wrong rank padding, a wrong dropout mask in
forward or backward, dtype handling (bf16/fp16 x with fp32 adapters), stride bugs.
"""

import pytest
import torch

from lorakernels import lora_linear, ops
from tests.utils import assert_close_to_reference, make_inputs, reference_grads, replay_keep_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): one token, odd sizes below one block, and several blocks with ragged edges.
SHAPES = [(1, 33, 17), (37, 45, 53), (130, 97, 75)]


def run_case(M, K, N, r, dtype, p, bias=True, adapter_dtype=None, leading=None, transpose=False,
             backend="triton", base_gemm="triton", scaling=0.75):
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, adapter_dtype, bias, leading)
    if transpose:  # a non-contiguous x: the transpose of a contiguous (K, M) tensor
        x = torch.randn(K, M, dtype=dtype).t()
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    rng_state = torch.get_rng_state()
    y = lora_linear(x, weight, b, lora_A, lora_B, scaling, p, backend=backend, base_gemm=base_gemm)
    keep = replay_keep_mask(rng_state, x.numel() // K, K, p, backend)
    dy = torch.randn(y.shape, dtype=dtype)
    y.backward(dy)

    y64, grads64 = reference_grads(x, weight, b, lora_A, lora_B, scaling, keep, p, dy.double(), upcast=True)
    y_lp, grads_lp = reference_grads(x, weight, b, lora_A, lora_B, scaling, keep, p, dy, upcast=False)
    errors = {"y": assert_close_to_reference("y", y.detach(), y64, y_lp, dtype)}
    for name, actual, exp64, lowp in zip(("dx", "dA", "dB"), (x.grad, lora_A.grad, lora_B.grad), grads64, grads_lp):
        assert actual.dtype == (x.dtype if name == "dx" else lora_A.dtype), f"{name} dtype {actual.dtype}"
        errors[name] = assert_close_to_reference(name, actual, exp64, lowp, dtype)
    assert y.dtype == dtype
    return errors


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp64_reference(dtype, shape, p):
    M, K, N = shape
    r = {1: 1, 37: 4, 130: 16}[M]
    run_case(M, K, N, r, dtype, p, bias=M != 37)


@pytest.mark.parametrize("r", [1, 4, 16, 64, 256])
def test_ranks_bf16_x_fp32_adapters(r):
    run_case(70, 48, 40, r, torch.bfloat16, 0.1, adapter_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_adapters_and_3d_input(dtype):
    run_case(0, 40, 24, 8, dtype, 0.1, adapter_dtype=torch.float32, leading=(3, 11))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_input(dtype):
    run_case(45, 36, 28, 4, dtype, 0.1, transpose=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cublas_base_gemm_strategy(dtype):
    """The strategy that leaves X W^T and dY W to torch.addmm and fuses only the LoRA terms."""
    run_case(37, 45, 53, 8, dtype, 0.1, base_gemm="cublas")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_fp64_reference(dtype, p):
    """The default CPU path (plain PyTorch, its own mask stream) obeys the same error rule."""
    run_case(37, 45, 53, 4, dtype, p, backend="torch")
    run_case(0, 24, 16, 4, dtype, p, backend="torch", leading=(2, 5))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    """M == 0: empty output of the right shape, zero adapter gradients, no launch errors."""
    x, weight, b, lora_A, lora_B = make_inputs(0, 24, 16, 4, torch.float32)
    x = x.reshape(0, 3, 24).requires_grad_()  # zero tokens in a 3-D batch
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = lora_linear(x, weight, b, lora_A, lora_B, 2.0, 0.1, backend=backend)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(lora_A.grad, torch.zeros_like(lora_A))
    assert torch.equal(lora_B.grad, torch.zeros_like(lora_B))


def test_frozen_adapters_and_input_without_grad():
    """Gradients are produced only for what requires them, and still match the reference."""
    x, weight, b, lora_A, lora_B = make_inputs(37, 45, 53, 4, torch.float32)
    lora_B.requires_grad_()
    y = lora_linear(x, weight, b, lora_A, lora_B, 0.5, 0.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert lora_A.grad is None and x.grad is None
    _, (_, _, db64) = reference_grads(x, weight, b, lora_A, lora_B, 0.5, None, 0.0, dy.double(), upcast=True)
    torch.testing.assert_close(lora_B.grad.double(), db64, rtol=1e-5, atol=1e-5)

    lora_A.requires_grad_()
    lora_B.requires_grad_(False)
    lora_B.grad = None
    y = lora_linear(x, weight, b, lora_A, lora_B, 0.5, 0.0)
    y.backward(dy)
    assert lora_B.grad is None
    _, (_, da64, _) = reference_grads(x, weight, b, lora_A, lora_B, 0.5, None, 0.0, dy.double(), upcast=True)
    torch.testing.assert_close(lora_A.grad.double(), da64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic(dtype):
    """Two backward passes on the same inputs give bitwise-identical gradients (no atomics)."""
    x, weight, b, lora_A, lora_B = make_inputs(130, 40, 36, 8, dtype)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
        torch.manual_seed(7)
        y = lora_linear(leaves[0], weight, b, leaves[1], leaves[2], 2.0, 0.1)
        y.backward(torch.ones_like(y))
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(37, 45, 53), (64, 48, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_base_gemm_alone(dtype, shape):
    """F2 and B2 with the rank-R term switched off (what the benchmarks set against cuBLAS)
    compute X W^T + b and dY W; unaligned and aligned shapes take different launch paths."""
    M, K, N = shape
    x, weight, b, _, _ = make_inputs(M, K, N, 1, dtype)
    dy = torch.randn(M, N, dtype=dtype)
    for actual, exp64, lowp in (
        (ops.base_gemm_forward(x, weight, b), x.double() @ weight.double().t() + b.double(),
         torch.nn.functional.linear(x, weight, b)),
        (ops.base_gemm_forward(x, weight), x.double() @ weight.double().t(), x @ weight.t()),
        (ops.base_gemm_grad_x(dy, weight), dy.double() @ weight.double(), dy @ weight),
    ):
        assert actual.dtype == dtype
        assert_close_to_reference("base GEMM", actual, exp64, lowp, dtype)
