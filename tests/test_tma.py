"""The Hopper TMA-persistent F2 and B2 (base_gemm="triton-tma"): the same numerics as the pointer
kernels through the interpreter (which runs tensor descriptors), the TMA kernels really launched
where operands allow, and a clean fallback to the pointer kernels where they do not.

Each case would catch: a wrong tile coordinate or descriptor block (ragged M and N, K not a
multiple of BLOCK_K), a persistent loop that skips or repeats tiles (3 programs, many tiles),
a wrong transpose of W's block in F2, a mask misplaced in B2, or a launcher that sends an
operand TMA cannot address to the TMA kernels (odd K, fp32, a misaligned view).
"""

import pytest
import torch

from lorakernels import lora_linear, ops
from lorakernels import plan as plan_module
from lorakernels.ops import specs
from lorakernels.plan import BaseGemm, resolve_plan
from tests.test_lora_linear import run_case
from tests.utils import DEVICE, assert_close_to_reference, make_inputs, reference_grads


@pytest.fixture
def launched(monkeypatch):
    """The spec codes launched during a test."""
    codes = []
    launch = specs.KernelSpec.launch

    def spy(spec, *args, **kwargs):
        if spec.gemm:
            codes.append(spec.code)
        return launch(spec, *args, **kwargs)

    monkeypatch.setattr(specs.KernelSpec, "launch", spy)
    return codes


TMA_CASES = [  # (M, K, N, r, x dtype, adapter dtype, p): 16-bit x, K and N multiples of 8
    (70, 96, 80, 8, torch.bfloat16, torch.float32, 0.1),  # ragged M and N (interpreter tiles 32 x 64)
    (64, 128, 64, 16, torch.float16, torch.float16, 0.0),  # whole tiles
    (37, 48, 40, 40, torch.bfloat16, torch.bfloat16, 0.5),  # K = 1.5 BLOCK_K, rank > 32 (dB by B3)
    (1, 32, 16, 1, torch.float16, torch.float32, 0.1),  # one token
]


@pytest.mark.skipif(DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9, reason="needs sm_90")
@pytest.mark.parametrize("M, K, N, r, dtype, adapter_dtype, p", TMA_CASES)
def test_tma_kernels_match_fp64_reference(launched, M, K, N, r, dtype, adapter_dtype, p):
    run_case(M, K, N, r, dtype, p, adapter_dtype=adapter_dtype, base_gemm="triton-tma")
    assert "F2-TMA" in launched and "B2-TMA" in launched and not {"F2", "B2"} & set(launched)


@pytest.mark.parametrize("case", ["odd K", "fp32", "misaligned view"])
def test_operands_tma_cannot_address_take_the_pointer_kernels(launched, case):
    if case == "odd K":
        run_case(33, 45, 40, 4, torch.bfloat16, 0.1, base_gemm="triton-tma")
    elif case == "fp32":
        run_case(33, 48, 40, 4, torch.float32, 0.1, base_gemm="triton-tma")
    else:  # rows 16-byte aligned in stride, but the view starts 2 bytes into its storage (and so do dY, dX)
        x, weight, bias, lora_A, lora_B = make_inputs(9, 48, 40, 4, torch.bfloat16)
        shifted = torch.empty(9 * 48 + 1, dtype=torch.bfloat16)[1:].view(9, 48).copy_(x).requires_grad_()
        lora_A.requires_grad_()
        lora_B.requires_grad_()
        y = lora_linear(shifted, weight, bias, lora_A, lora_B, 0.5, base_gemm="triton-tma")
        dy = torch.empty(9 * 40 + 1, dtype=torch.bfloat16)[1:].view(9, 40).copy_(torch.randn(9, 40))
        y.backward(dy)
        y64, grads64 = reference_grads(x, weight, bias, lora_A, lora_B, 0.5, None, 0.0, dy.double(), upcast=True)
        y_lp, grads_lp = reference_grads(x, weight, bias, lora_A, lora_B, 0.5, None, 0.0, dy, upcast=False)
        assert_close_to_reference("y", y.detach(), y64, y_lp, torch.bfloat16)
        for name, actual, exp64, lowp in zip(("dx", "dA", "dB"), (shifted.grad, lora_A.grad, lora_B.grad), grads64,
                                             grads_lp):
            assert_close_to_reference(name, actual, exp64, lowp, torch.bfloat16)
    assert "F2" in launched and "F2-TMA" not in launched
    assert "B2" in launched and "B2-TMA" not in launched


def test_gemm_alone_on_the_tma_path(launched):
    x, weight, bias, _, _ = make_inputs(70, 96, 80, 4, torch.bfloat16)
    dy = torch.randn(70, 80).to(torch.bfloat16)
    plan = resolve_plan(DEVICE, "triton", "triton-tma")
    for actual, exp64, lowp in ((ops.base_gemm_forward(x, weight, bias, plan=plan),
                                 x.double() @ weight.double().t() + bias.double(),
                                 torch.nn.functional.linear(x, weight, bias)),
                                (ops.base_gemm_grad_x(dy, weight, plan=plan), dy.double() @ weight.double(), dy @ weight)):
        assert_close_to_reference("GEMM", actual, exp64, lowp, torch.bfloat16)
    assert launched == ["F2-TMA", "B2-TMA"]


def test_ampere_resolves_tma_to_the_pointer_kernels(monkeypatch):
    """The plan picks by capability: sm_80 has no TMA, so triton-tma means the pointer kernels there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(plan_module, "_RESOLVED", {})  # plans are cached per device, whose capability is fixed
    assert resolve_plan(torch.device("cuda"), "triton", "triton-tma").base_gemm is BaseGemm.TRITON
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(plan_module, "_RESOLVED", {})
    assert resolve_plan(torch.device("cuda"), "triton", "triton-tma").base_gemm is BaseGemm.TRITON_TMA


def test_gemm_benchmark_compares_the_three_strategies(tmp_path):
    """One run times the pointer-kernel GEMM, the TMA-persistent GEMM and cuBLAS on the same operands."""
    from benchmarks.bench_layer import gemm_benchmark
    from benchmarks.harness import Budget
    from benchmarks.report import write_markdown

    records = gemm_benchmark(DEVICE, 64, 48, 32, torch.bfloat16, Budget(rounds=1))
    assert {(r["provider"], r["mode"]) for r in records if r["metric"] == "time"} == {
        (p, m) for p in ("triton-gemm", "triton-tma-gemm", "cublas") for m in ("forward", "grad-x")}
    env = dict(protocol="test", device="d", torch="t", triton="t", timestamp="now", note="n")
    write_markdown(records, env, tmp_path / "results.md")
    assert "| 64 | 48 | forward | triton-tma-gemm |" in (tmp_path / "results.md").read_text()


def test_layer_benchmark_has_a_tma_provider_sharing_the_adapter():
    from benchmarks.providers import make_providers

    providers = make_providers(64, 48, 4, torch.bfloat16, 0.1, DEVICE, names=["lorakernels", "lorakernels-tma"])
    fused, tma = providers["lorakernels"].module, providers["lorakernels-tma"].module
    assert tma.base_gemm == "triton-tma" and tma.lora_A is fused.lora_A and tma.weight is fused.weight
