"""torch.compile (fullgraph, no recompiles for new scalars or seeds) and autocast.

The op is a pair of torch.library custom ops with a registered autograd formula; a graph
break, a recompile per call (a specialized seed or scaling), or a mismatch with eager would
fail here.
"""

import pytest
import torch
import torch.utils.checkpoint
from torch._dynamo.testing import CompileCounter

from lorakernels import LoRALinear, lora_linear
from tests.utils import DEVICE, make_inputs


def two_layer_model(p=0.0, backend=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(LoRALinear(24, 32, r=4, lora_alpha=8, lora_dropout=p, backend=backend),
                                torch.nn.GELU(),
                                LoRALinear(32, 16, r=4, lora_alpha=8, lora_dropout=p, backend=backend))
    for m in model:
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B)
    return model


def grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    y = model(x)
    y.pow(2).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", ["torch", None])
def test_fullgraph_compile_matches_eager(backend):
    model = two_layer_model(backend=backend)
    x = torch.randn(3, 5, 24)
    eager = grads(model, x)
    torch._dynamo.reset()
    compiled = grads(torch.compile(model, fullgraph=True), x)
    # Inductor fuses the GELU and the loss differently: fp32 rounding, a few ulps of O(10) values.
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_new_scaling_and_new_seeds_do_not_recompile():
    torch._dynamo.reset()
    counter = CompileCounter()
    layer = two_layer_model(p=0.1, backend="torch")[0]

    @torch.compile(backend=counter, fullgraph=True)
    def f(x, scaling):
        return lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, scaling, 0.1)

    x = torch.randn(6, 24)
    outs = [f(x, s) for s in (0.5, 0.75, 1.25, 2.0, 3.0, 4.0)]
    # torch.compile's automatic dynamic: the first new value makes scaling a symbolic input (one
    # recompile); after that neither new scalings nor the new dropout seed of every call recompile.
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 6 calls"
    assert not torch.equal(outs[0] * 0.75 / 0.5, outs[1])


def test_scalar_pack_round_trips_seeds_and_floats():
    """The seed travels as a float64: every seed draw_seed can return must come back exact."""
    from lorakernels.autograd import draw_seed, pack_scalars, unpack_scalars

    # Seeds as draw_seed gives them: ints and int64 CPU tensors (whatever the default device).
    largest = torch.tensor(2**31 - 2, device="cpu")
    for seed in (0, 2**31 - 2, largest, draw_seed()):
        packed = pack_scalars(seed, 0.3, 0.25)
        assert (packed.device.type, packed.dtype) == ("cpu", torch.float64)  # read without a GPU sync
        assert unpack_scalars(packed) == (int(seed), 0.3, 0.25)
    packed = torch.compile(pack_scalars, fullgraph=True, backend="eager")(largest, 0.3, 0.25)
    assert (packed.device.type, packed.dtype) == ("cpu", torch.float64)
    assert unpack_scalars(packed) == (2**31 - 2, 0.3, 0.25)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_dropout_backward_uses_the_forward_mask(checkpointed):
    """Also under activation checkpointing inside the compiled region (a combination PEFT users
    report wrong results for): the recomputed forward must regenerate the same mask."""
    K, p = 32, 0.5
    weight = torch.zeros(K, K)
    lora_A = torch.eye(K).requires_grad_()
    lora_B = torch.eye(K).requires_grad_()

    def layer(x):
        return lora_linear(x, weight, None, lora_A, lora_B, 1.0, p, backend="torch")

    torch._dynamo.reset()
    body = (lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)) if checkpointed else layer
    f = torch.compile(body, fullgraph=True)
    x = (torch.rand(20, K) + 1.0).requires_grad_()
    y = f(x)
    y.backward(torch.ones_like(y))
    kept = y.detach() != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.equal(kept, x.grad != 0)


@pytest.mark.parametrize("backend", ["torch", None])
def test_autocast_behaves_like_nn_linear(backend):
    layer = LoRALinear(24, 16, r=4, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 24, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.float32
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (
        x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_gradient_accumulation_adds_up():
    model = two_layer_model()
    x1, x2 = torch.randn(4, 24), torch.randn(4, 24)
    model.zero_grad()
    (model(x1).sum() + model(x2).sum()).backward()
    joint = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model(x1).sum().backward()
    model(x2).sum().backward()
    for a, b in zip(joint, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_eager_path_equals_the_custom_ops(backend, monkeypatch):
    """Eager mode runs a plain autograd.Function (no custom-op dispatch per call); it must
    compute, save and differentiate exactly as the custom ops that torch.compile sees."""
    from lorakernels import autograd, functional
    from lorakernels.plan import Backend, LaunchPlan
    from lorakernels.testing import saved_activation_bytes

    x, weight, bias, lora_A, lora_B = make_inputs(37, 24, 20, 4, torch.float32)
    scalars = torch.tensor([1234.0, 0.5, 0.25], dtype=torch.float64, device="cpu")
    plan = LaunchPlan(Backend(backend))

    def run(path):
        leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)]
        call = (lambda: path(leaves[0], weight, bias, leaves[1], leaves[2], scalars))
        saved, y = saved_activation_bytes(call, [weight, bias, *leaves[1:]])
        y.backward(dy)
        return saved, [y.detach()] + [t.grad for t in leaves]

    dy = torch.randn(37, 20)
    saved_op, custom_op = run(lambda *a: autograd.lora_linear_forward_op(*a, *plan.to_op_args())[0])
    saved_eager, eager = run(lambda *a: autograd.EagerLoRALinear.apply(
        *a[:5], autograd.EagerCall(plan, autograd.BaseOpArgs(a[1]), autograd.unpack_scalars(a[5]))))
    # x and U; the custom op also saves its 24-byte scalar pack, eager autograd keeps Python numbers.
    assert saved_op == x.nbytes + 4 * 37 * 4 + 24 and saved_eager == saved_op - 24
    for a, b in zip(eager, custom_op):
        assert torch.equal(a, b)

    # ... and lora_linear takes that path outside torch.compile.
    def refuse(*args):
        raise AssertionError("the custom op ran in eager mode")

    monkeypatch.setattr(functional, "lora_linear_forward_op", refuse)
    lora_linear(x, weight, bias, lora_A.requires_grad_(), lora_B, 0.5, 0.25, backend=backend).sum().backward()
    assert lora_A.grad is not None
