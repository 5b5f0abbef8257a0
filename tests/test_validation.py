"""Bad input: a clear TypeError/ValueError that names shapes, dtypes, devices; nothing modified."""

import pytest
import torch

from lorakernels import LoRALinear, lora_linear, plan
from tests.utils import make_inputs


def operands():
    x, weight, b, lora_A, lora_B = make_inputs(5, 12, 10, 4, torch.float32)
    return dict(x=x, weight=weight, bias=b, lora_A=lora_A, lora_B=lora_B, scaling=1.0, dropout_p=0.0)


def call(**overrides):
    args = operands()
    args.update(overrides)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and not v.is_meta}
    try:
        lora_linear(**args)
    finally:
        for k, before in snapshot.items():
            assert torch.equal(args[k], before), f"{k} was modified by a rejected call"


BAD = [
    (dict(x=torch.randn(5, 11)), ValueError, r"in_features = 12.*\(5, 11\)"),
    (dict(weight=torch.randn(10, 12, 1)), ValueError, r"weight must be \(out_features, in_features\)"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must be \(out_features,\) = \(10,\); got \(9,\)"),
    (dict(lora_A=torch.randn(4, 13)), ValueError, r"lora_A must be \(r, in_features\) = \(r, 12\); got \(4, 13\)"),
    (dict(lora_B=torch.randn(10, 3)), ValueError, r"lora_B must be \(out_features, r\) = \(10, 4\); got \(10, 3\)"),
    (dict(lora_A=torch.randn(0, 12), lora_B=torch.randn(10, 0)), ValueError, r"rank r .* got 0"),
    (dict(lora_A=torch.randn(257, 12), lora_B=torch.randn(10, 257)), ValueError, r"\[1, 256\]; got 257"),
    (dict(x=torch.randint(0, 3, (5, 12))), TypeError, r"x must be float32.*torch.int64"),
    (dict(weight=torch.randint(0, 3, (10, 12))), TypeError, r"weight and bias must have x's dtype.*torch.int64"),
    (dict(lora_A=torch.randn(4, 12, dtype=torch.float64)), TypeError, r"lora_A and lora_B .*torch.float64"),
    (dict(x=torch.randn(5, 12, device="meta")), TypeError, r"one device.*x \(5, 12\) torch.float32 on meta"),
    (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor; got list"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\); got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\); got -0.1"),
    (dict(scaling=float("nan")), TypeError, r"scaling must be a finite"),
    (dict(weight=torch.randn(10, 12, requires_grad=True)), ValueError, r"frozen.*\(10, 12\)"),
    (dict(lora_A=torch.randn(12, 4).t()), ValueError, r"lora_A must have a unit stride"),
]


@pytest.mark.parametrize("overrides, error, message", BAD, ids=[m for _, _, m in BAD])
def test_rejects_bad_input(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_rejects_unknown_backend_and_strategy():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        call(backend="cuda")
    with pytest.raises(ValueError, match=r"base GEMM strategy must be one of .* got 'magma'"):
        call(base_gemm="magma")


def test_lora_linear_module_refuses_unknown_backend_and_strategy_when_built():
    """At construction, not at the first forward."""
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        LoRALinear(8, 4, backend="cuda")
    with pytest.raises(ValueError, match=r"base GEMM strategy must be one of .* got 'magma'"):
        LoRALinear.from_linear(torch.nn.Linear(8, 4), base_gemm="magma")


def test_forced_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(plan, "_KERNELS_INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with torch.device("cpu"):
        cpu_operands = operands()
    message = r"backend 'triton' needs CUDA tensors.*TRITON_INTERPRET=1.*got tensors on cpu"
    with pytest.raises(ValueError, match=message):
        call(**cpu_operands, backend="triton")
    monkeypatch.setenv("LORAKERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA"):
        call(**cpu_operands)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(r=0), ValueError, r"r must be in \[1, 256\]; got 0"),
    (dict(r=2.5), TypeError, r"r must be an int; got 2.5"),
    (dict(lora_dropout=1.5), ValueError, r"dropout_p must be in \[0, 1\); got 1.5"),
    (dict(lora_alpha="8"), TypeError, r"lora_alpha must be a finite number; got '8'"),
])
def test_module_rejects_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRALinear(12, 10, **kwargs)


def test_from_linear_rejects_bad_rank_without_touching_the_linear():
    linear = torch.nn.Linear(12, 10)
    with pytest.raises(ValueError, match=r"r must be in \[1, 256\]; got 300"):
        LoRALinear.from_linear(linear, r=300)
    assert linear.weight.requires_grad  # not frozen by a rejected call
    with pytest.raises(TypeError, match=r"expects an nn.Linear; got Conv1d"):
        LoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_width_input_is_a_value_error():
    """Catches a raw reshape RuntimeError for in_features = 0 (nn.Linear allows it; an adapter has no
    weights to learn there), and a LoRALinear that accepts the width lora_linear rejects."""
    with pytest.raises(ValueError, match=r"in_features must be positive.*x \(5, 0\), weight \(10, 0\)"):
        call(x=torch.randn(5, 0), weight=torch.randn(10, 0), lora_A=torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"in_features and out_features must be positive; got \(0, 10\)"):
        LoRALinear(0, 10)
    with pytest.raises(ValueError, match=r"in_features and out_features must be positive; got \(0, 10\)"):
        LoRALinear.from_linear(torch.nn.Linear(0, 10))


@pytest.mark.parametrize("dtype, adapter_dtype, scaling", [
    (torch.float32, torch.float32, 1e39),
    (torch.float16, torch.float16, 1e5),
], ids=["fp32", "fp16"])
def test_scaling_beyond_the_adapter_dtype_is_rejected(dtype, adapter_dtype, scaling):
    """Catches a scaling that is inf in the adapters' dtype (NaN outputs) being accepted by lora_linear."""
    x, weight, b, lora_A, lora_B = make_inputs(5, 12, 10, 4, dtype)
    message = rf"scaling = {scaling:g} \(r = 4\) is not finite in the adapters' dtype {adapter_dtype}"
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        call(x=x, weight=weight, bias=b, lora_A=lora_A.to(adapter_dtype), lora_B=lora_B.to(adapter_dtype),
             scaling=scaling)


def test_scaling_is_checked_against_the_adapter_dtype_not_x():
    """Catches a check made on x's dtype: fp32 adapters with fp16 x hold a scaling above fp16's range."""
    x, weight, b, lora_A, lora_B = make_inputs(5, 12, 10, 4, torch.float16)
    y = lora_linear(x, weight, b, lora_A.float(), lora_B.float() * 1e-6, 1e5)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=1, lora_alpha=1e6, dtype=torch.float16),
     r"scaling = 1e\+06 \(lora_alpha / r = 1000000.0 / 1\) is not finite in the adapters' dtype torch.float16"),
    (dict(r=4, lora_alpha=1e39, use_rslora=True),
     r"scaling = 5e\+38 \(lora_alpha / sqrt\(r\) = 1e\+39 / sqrt\(4\)\) .* torch.float32 \(largest 3.40282e\+38\)"),
    (dict(r=2, lora_alpha=1e39, dtype=torch.bfloat16, adapter_dtype=torch.float16),
     r"lora_alpha / r = 1e\+39 / 2\) is not finite in the adapters' dtype torch.float16"),
], ids=["fp16", "rslora-fp32", "fp16-adapters"])
def test_module_rejects_a_scaling_beyond_the_adapter_dtype(kwargs, message):
    """Catches LoRALinear accepting a lora_alpha whose scaling is inf in the adapters' dtype (NaN outputs)."""
    with pytest.raises(ValueError, match=message):
        LoRALinear(12, 10, **kwargs)
    dtype = kwargs.pop("dtype", None)
    linear = torch.nn.Linear(12, 10, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        LoRALinear.from_linear(linear, **kwargs)
    assert linear.weight.requires_grad  # not frozen by a rejected call
