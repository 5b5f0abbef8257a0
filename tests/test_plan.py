"""The launch plan: typed resolution, the environment read once by `resolve_plan`, the custom-op
round trip, and `base_gemm` reaching the launchers from LoRALinear and apply_lora.

Each test would catch: a string or enum member refused or mapped to the wrong member, an
argument losing to the environment, a layer below the boundary re-reading the environment,
a plan field lost or retyped at the custom-op boundary, a `base_gemm` that a module or
apply_lora drops on the way to the launchers.
"""

import itertools
import os
import sys

import pytest
import torch
from torch import nn

from lorakernels import LoRALinear, apply_lora, lora_linear, ops, plan
from lorakernels.plan import Backend, BaseGemm, LaunchPlan, resolve_plan
from tests.utils import DEVICE, make_inputs

PLAN_PY = sys.modules["lorakernels.plan"].__file__


@pytest.fixture(autouse=True)
def _no_plan_environment(monkeypatch):
    monkeypatch.delenv("LORAKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("LORAKERNELS_BASE_GEMM", raising=False)


@pytest.mark.parametrize("backend, base_gemm", list(itertools.product(Backend, BaseGemm)), ids=str)
def test_members_and_their_strings_resolve_alike(backend, base_gemm):
    by_member = resolve_plan(DEVICE, backend, base_gemm)
    assert (by_member.backend, by_member.base_gemm) == (backend, base_gemm)
    assert resolve_plan(DEVICE, backend.value, base_gemm.value) == by_member


def test_auto_backend_runs_triton_where_it_can(monkeypatch):
    assert resolve_plan(torch.device("cuda")).backend is Backend.TRITON
    monkeypatch.setattr(plan, "_KERNELS_INTERPRETED", True)
    assert resolve_plan(torch.device("cpu"), "auto").backend is Backend.TRITON
    monkeypatch.setattr(plan, "_KERNELS_INTERPRETED", False)  # kernels compiled for GPUs at import
    assert resolve_plan(torch.device("cpu")).backend is Backend.TORCH
    assert resolve_plan(torch.device("cuda"), Backend.TRITON).backend is Backend.TRITON


def test_environment_fills_only_what_the_arguments_leave_open(monkeypatch):
    monkeypatch.setenv("LORAKERNELS_BACKEND", "torch")
    monkeypatch.setenv("LORAKERNELS_BASE_GEMM", "cublas")
    assert resolve_plan(DEVICE) == LaunchPlan(Backend.TORCH, BaseGemm.CUBLAS, resolve_plan(DEVICE).tf32)
    explicit = resolve_plan(DEVICE, Backend.TRITON, "triton")
    assert (explicit.backend, explicit.base_gemm) == (Backend.TRITON, BaseGemm.TRITON)


def test_bad_choices_name_the_choices_and_where_the_value_came_from(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\) "
                                         r"\(argument or env LORAKERNELS_BACKEND\); got 'cuda'"):
        resolve_plan(DEVICE, "cuda")
    monkeypatch.setenv("LORAKERNELS_BASE_GEMM", "magma")
    with pytest.raises(ValueError, match=r"base GEMM strategy must be one of \('triton', 'triton-tma', 'cublas', 'auto'\) "
                                         r"\(argument or env LORAKERNELS_BASE_GEMM\); got 'magma'"):
        resolve_plan(DEVICE)
    with pytest.raises(ValueError, match=r"base GEMM strategy must be one of .* got 'magma'"):
        LoRALinear(8, 8, base_gemm="magma")  # at construction, not at the first forward


def test_tf32_follows_torchs_switch_on_cuda_only():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # a property of torch's (monkeypatch cannot restore it)
    try:
        matmul.allow_tf32 = True
        assert resolve_plan(torch.device("cuda")).tf32
        assert not resolve_plan(torch.device("cpu"), "torch").tf32
        matmul.allow_tf32 = False
        assert not resolve_plan(torch.device("cuda")).tf32
    finally:
        matmul.allow_tf32 = before


ALL_PLANS = [LaunchPlan(b, g, t) for b, g, t in itertools.product(Backend, BaseGemm, (False, True))]


@pytest.mark.parametrize("plan", ALL_PLANS, ids=lambda plan: "-".join(map(str, plan.to_op_args())))
def test_plan_round_trips_through_the_custom_op_arguments(plan):
    args = plan.to_op_args()
    assert [type(a) for a in args] == [str, str, bool]
    assert LaunchPlan.from_op_args(*args) == plan
    # ... and those are arguments of the forward op's schema, in that order (only the 4-bit base's
    # optional arguments follow them).
    schema = str(torch.ops.lorakernels.lora_linear_forward.default._schema)
    assert "str backend, str base_gemm, bool tf32, Tensor? weight_absmax=None" in schema


class _RecordingEnviron(dict):
    """os.environ stand-in that records who reads the LORAKERNELS_* variables."""

    def __init__(self, environ, reads):
        super().__init__(environ)
        self.reads = reads

    def _record(self, key):
        if key.startswith("LORAKERNELS_"):
            self.reads.append((key, sys._getframe(2).f_code.co_filename))

    def get(self, key, default=None):
        self._record(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._record(key)
        return super().__getitem__(key)


def _plans_seen(monkeypatch):
    """The plans ops.lora_forward / ops.lora_backward receive, in call order."""
    seen = []
    for name in ("lora_forward", "lora_backward"):
        def spy(*args, _original=getattr(ops, name), **kwargs):
            seen.append(next(a for a in (*args, *kwargs.values()) if isinstance(a, LaunchPlan)))
            return _original(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return seen


def test_environment_is_read_once_per_call_and_only_by_resolve_plan(monkeypatch):
    reads = []
    monkeypatch.setattr(os, "environ", _RecordingEnviron(os.environ, reads))
    os.environ["LORAKERNELS_BASE_GEMM"] = "cublas"
    plans = _plans_seen(monkeypatch)
    x, weight, bias, lora_A, lora_B = make_inputs(9, 13, 11, 2, torch.float32)
    lora_linear(x.requires_grad_(), weight, bias, lora_A.requires_grad_(), lora_B, 0.5, 0.1).sum().backward()
    assert reads == [("LORAKERNELS_BACKEND", PLAN_PY), ("LORAKERNELS_BASE_GEMM", PLAN_PY)]
    assert [p.base_gemm for p in plans] == [BaseGemm.CUBLAS, BaseGemm.CUBLAS]


def _output_and_grads(layer, x, dy):
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout seed for every layer
    y = layer(x)
    y.backward(dy)
    return [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_module_with_cublas_base_gemm_matches_the_default(p, monkeypatch):
    default = LoRALinear(45, 37, r=4, lora_alpha=8, lora_dropout=p, backend="triton")
    nn.init.normal_(default.lora_B)
    cublas = LoRALinear(45, 37, r=4, lora_alpha=8, lora_dropout=p, backend="triton", base_gemm="cublas")
    cublas.load_state_dict(default.state_dict())
    assert "base_gemm=cublas" in repr(cublas) and cublas.base_gemm == "cublas"
    x, dy = torch.randn(3, 7, 45), torch.randn(3, 7, 37)
    plans = _plans_seen(monkeypatch)
    expected = _output_and_grads(default, x, dy)
    assert [plan.base_gemm for plan in plans] == [BaseGemm.AUTO] * 2
    del plans[:]
    actual = _output_and_grads(cublas, x, dy)
    assert [plan.base_gemm for plan in plans] == [BaseGemm.CUBLAS] * 2
    for name, a, e in zip(("y", "dx", "dA", "dB"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


def test_apply_lora_gives_base_gemm_to_every_layer(monkeypatch):
    model = nn.Sequential(nn.Linear(9, 11), nn.ReLU(), nn.Linear(11, 5))
    with pytest.raises(ValueError, match="base GEMM strategy"):
        apply_lora(model, r"\d", r=2, base_gemm="magma")
    assert not any(isinstance(m, LoRALinear) for m in model)  # a bad strategy changed nothing
    apply_lora(model, r"\d", r=2, base_gemm=BaseGemm.CUBLAS)
    layers = [m for m in model if isinstance(m, LoRALinear)]
    assert len(layers) == 2 and all(m.base_gemm is BaseGemm.CUBLAS for m in layers)
    plans = _plans_seen(monkeypatch)
    model(torch.randn(4, 9))
    assert [p.base_gemm for p in plans] == [BaseGemm.CUBLAS] * 2
