"""base_gemm='auto': the measured-fastest strategy per kind of GEMM pass, chosen once.

Timing needs a GPU; here the measurement is allowed on CPU tensors and the timer is a table
of made-up times per strategy, so these tests catch: a choice that is not the fastest measured,
a kind measured more than once (a per-call cost), kinds that should be told apart (token
bucket, shape, dropout) sharing a choice, the chosen strategy not being the one that computes
the result, and a wrong result from either strategy or from the measured run itself.
"""

import pytest
import torch

from lorakernels import LoRALinear, lora_linear
from lorakernels.operands import FourBitWeight
from lorakernels.ops import gemm_strategy, specs
from lorakernels.plan import BaseGemm
from tests.utils import make_inputs


@pytest.fixture
def timings(monkeypatch):
    """Make every kind measurable and time each strategy from `times` (ms); record the timings."""
    times = {BaseGemm.TRITON: 1.0, BaseGemm.CUBLAS: 2.0, BaseGemm.TRITON_TMA: 3.0}
    measured = []
    launched = []

    def time_ms(run):
        before = len(launched)
        run()
        strategy = launched[before]  # the first GEMM launch of the run says which strategy ran
        measured.append(strategy)
        return times[strategy]

    original = specs.KernelSpec.launch

    def spy(self, grid, config=None, **values):
        if self.code in ("F2", "B2"):
            launched.append(BaseGemm.TRITON if values["BASE_GEMM"] else BaseGemm.CUBLAS)
        elif self.code in ("F2-TMA", "B2-TMA"):
            launched.append(BaseGemm.TRITON_TMA)
        elif self.code in ("F2-4bit", "B2-4bit"):
            launched.append(self.code)
        return original(self, grid, config, **values)

    monkeypatch.setattr(specs.KernelSpec, "launch", spy)
    monkeypatch.setattr(gemm_strategy, "_measurable", lambda device: True)
    monkeypatch.setattr(gemm_strategy, "time_ms", time_ms)
    monkeypatch.setattr(gemm_strategy, "_CHOSEN", {})
    return times, measured, launched


def _call(M, K=48, N=40, r=4, p=0.1, dtype=torch.float32):
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, dtype)
    x.requires_grad_()
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, backend="triton", base_gemm="auto")
    y.sum().backward()
    return y


@pytest.mark.parametrize("fastest", [BaseGemm.TRITON, BaseGemm.CUBLAS, BaseGemm.TRITON_TMA])
def test_the_fastest_measured_strategy_runs(timings, fastest):
    times, measured, launched = timings
    times[fastest] = 0.5
    _call(33)
    options = set(gemm_strategy.candidates(torch.device("cpu"), False))
    # Forward and dX were each timed once per strategy the call could take ...
    assert sorted(measured, key=str) == sorted([*options, *options], key=str)
    chosen = gemm_strategy.chosen_strategies()
    expected = fastest if fastest in options else BaseGemm.TRITON
    assert sorted(k[0] for k in chosen) == ["B2", "F2"] and set(chosen.values()) == {expected}
    # ... and after each measurement the chosen strategy computed the output.
    del launched[:]
    del measured[:]
    _call(33)
    assert measured == [] and launched == [expected, expected]


def test_a_kind_is_measured_once_and_kinds_are_told_apart(timings):
    times, measured, launched = timings
    _call(33)
    first = len(measured)
    assert first > 0
    _call(40)  # same token bucket, same shapes: no new measurement
    assert len(measured) == first
    _call(300)  # another token bucket
    _call(40, N=56)  # another shape
    _call(40, p=0.0)  # no dropout
    assert len(gemm_strategy.chosen_strategies()) == 2 * 4
    assert len(measured) == 4 * first


def test_nothing_is_measured_where_it_cannot_be(monkeypatch):
    """CPU tensors (the interpreter): the fused kernel, untimed (and recorded: CPU tensors never
    become measurable)."""
    monkeypatch.setattr(gemm_strategy, "_CHOSEN", {})
    monkeypatch.setattr(gemm_strategy, "time_ms", lambda run: pytest.fail("timed where nothing is measurable"))
    _call(33)
    chosen = gemm_strategy.chosen_strategies()
    assert sorted(k[0] for k in chosen) == ["B2", "F2"] and set(chosen.values()) == {BaseGemm.TRITON}


@pytest.mark.parametrize("fastest", [BaseGemm.TRITON, BaseGemm.CUBLAS])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_either_choice_gives_the_result_of_the_explicit_strategy(timings, fastest, p):
    """The output and gradients of an auto call (measured on its first call, or looked up) equal
    those of the same strategy named explicitly."""
    times, _, _ = timings
    times[fastest] = 0.1
    torch.manual_seed(3)
    reference = LoRALinear(48, 40, r=4, lora_alpha=8, lora_dropout=p, backend="triton", base_gemm=fastest.value)
    torch.nn.init.normal_(reference.lora_B)
    auto = LoRALinear(48, 40, r=4, lora_alpha=8, lora_dropout=p, backend="triton", base_gemm="auto")
    auto.load_state_dict(reference.state_dict())
    x = torch.randn(2, 17, 48)

    def run(layer):
        x_ = x.clone().requires_grad_()
        torch.manual_seed(11)  # one dropout seed for both layers
        y = layer(x_)
        y.backward(torch.ones_like(y))
        return [y.detach(), x_.grad, layer.lora_A.grad, layer.lora_B.grad]

    expected = run(reference)
    for _ in range(2):  # the measured first call, then the looked-up one
        auto.zero_grad()
        for name, a, e in zip(("y", "dx", "dA", "dB"), run(auto), expected):
            assert torch.equal(a, e), name


def test_a_four_bit_base_runs_its_own_kernels_unmeasured(timings):
    """A packed W (a 4-bit base) has one strategy, its own fused kernels, never timed, whatever
    base_gemm asks: cuBLAS and TMA cannot read its codes. Would catch a 4-bit call being timed,
    sent to cuBLAS or TMA, or computing otherwise under another base_gemm."""
    _, measured, launched = timings
    N, K, blocksize = 40, 48, 32
    codes = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8)
    base = FourBitWeight(codes, torch.rand(N * K // blocksize) + 0.5, torch.randn(16), blocksize, (N, K))
    x, _, bias, lora_A, lora_B = make_inputs(33, K, N, 4, torch.float32)
    results = []
    for base_gemm in ("auto", "cublas", "triton-tma", "triton"):
        x_in = x.clone().requires_grad_()
        torch.manual_seed(5)  # one dropout seed for every call
        y = lora_linear(x_in, base, bias, lora_A, lora_B, 0.5, 0.1, backend="triton", base_gemm=base_gemm)
        y.sum().backward()
        results.append((y, x_in.grad))
    assert measured == [] and gemm_strategy.chosen_strategies() == {}
    assert launched == ["F2-4bit", "B2-4bit"] * 4
    for y, dx in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(dx, results[0][1])
    assert BaseGemm.CUBLAS in gemm_strategy.candidates(torch.device("cpu"), False)
