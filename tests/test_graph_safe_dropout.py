"""Dropout seeds drawn on the device (`graph_safe_dropout`, and automatically under CUDA graph
capture): the kernels read the seed from memory, so a captured graph draws a fresh mask at every
replay. Catches a kernel that ignores the seed tensor (or reads another), a backward that draws
another mask than its forward, a seed drawn on the host anyway, and (on a GPU) a captured step
that replays one mask or differs from eager steps drawing the same seeds."""

import pytest
import torch

import lorakernels
from lorakernels import autograd, functional, lora_linear
from lorakernels.autograd import BaseOpArgs, EagerCall, EagerLoRALinear
from lorakernels.plan import resolve_plan
from tests.utils import DEVICE, make_inputs


@pytest.fixture
def device_seeds():
    previous = lorakernels.graph_safe_dropout(True)
    yield
    lorakernels.graph_safe_dropout(previous)


def _seeds_drawn(monkeypatch):
    seeds = []
    original = autograd.device_seed

    def spy(x):
        seed = original(x)
        seeds.append(seed)
        return seed
    monkeypatch.setattr(functional, "device_seed", spy)
    return seeds


def _run(call, x, lora_A, lora_B, dy):
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)]
    y = call(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_device_seed_gives_the_mask_of_the_same_seed_on_the_host(device_seeds, monkeypatch, backend, dtype):
    x, weight, bias, lora_A, lora_B = make_inputs(37, 48, 40, 4, dtype)
    dy = torch.randn(37, 40, dtype=dtype)
    seeds = _seeds_drawn(monkeypatch)
    with_device_seed = _run(lambda x_, A, B: lora_linear(x_, weight, bias, A, B, 0.5, 0.3, backend=backend),
                            x, lora_A, lora_B, dy)
    (seed,) = seeds
    assert seed.shape == (1,) and seed.dtype == torch.int64 and seed.device == x.device
    plan = resolve_plan(x.device, backend)
    host = (int(seed), 0.5, 0.3)
    with_host_seed = _run(lambda x_, A, B: EagerLoRALinear.apply(x_, weight, bias, A, B,
                                                                 EagerCall(plan, BaseOpArgs(weight), host)),
                          x, lora_A, lora_B, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB"), with_device_seed, with_host_seed):
        assert torch.equal(a, b), name
    # ... and that mask is a real draw: another seed gives another output.
    other = (int(seed) + 1, 0.5, 0.3)
    y_other = EagerLoRALinear.apply(x, weight, bias, lora_A, lora_B, EagerCall(plan, BaseOpArgs(weight), other))
    assert not torch.equal(y_other, with_device_seed[0])


def test_device_seeds_follow_the_device_generator(device_seeds, monkeypatch):
    """torch.manual_seed reproduces them (checkpoint recompute restores the generator the same way);
    the host generator is not consumed."""
    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    outputs = []
    for _ in range(2):
        torch.manual_seed(5)
        outputs.append(lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.3))
        outputs.append(lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.3))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
    assert not torch.equal(outputs[0], outputs[1])
    monkeypatch.setattr(autograd, "draw_seed", lambda: pytest.fail("a host seed was drawn"))
    monkeypatch.setattr(functional, "draw_seed", lambda: pytest.fail("a host seed was drawn"))
    lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.3)


def test_off_by_default_and_no_seed_without_dropout(monkeypatch):
    seeds = _seeds_drawn(monkeypatch)
    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.3)
    assert seeds == [None]
    previous = lorakernels.graph_safe_dropout(True)
    try:
        lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0)
    finally:
        lorakernels.graph_safe_dropout(previous)
    assert seeds == [None]  # p = 0 draws nothing


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_captured_training_step_draws_fresh_masks_and_matches_eager(dtype):
    """A training step (forward, backward, optimizer) of a patched PEFT model captured in a CUDA
    graph: each replay draws new masks, and replays give the losses that eager steps give from the
    same generator state with device seeds."""
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).to(DEVICE, dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.25, target_modules=["0", "2"]))
    lorakernels.patch_peft(model)
    x = torch.randn(128, 64, device=DEVICE, dtype=dtype)
    target = torch.randn(128, 32, device=DEVICE, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(params, lr=0.5)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = (model(x).float() - target.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    previous = lorakernels.graph_safe_dropout(True)
    try:
        for _ in range(3):  # compile, autotune and choose strategies before capturing
            step()
        model.load_state_dict(state)
        torch.manual_seed(1)
        eager = [step() for _ in range(3)]
    finally:
        lorakernels.graph_safe_dropout(previous)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    model.load_state_dict(state)
    torch.manual_seed(1)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(static_loss.clone())
    assert lorakernels.peft_patch_stats(model)["fused"] > 0
    assert len({float(r) for r in replays}) == 3  # fresh masks (and updated adapters) at every replay
    torch.testing.assert_close(torch.stack(replays), torch.stack(eager), rtol=1e-5, atol=1e-6)


def test_several_adapters_in_a_batch_keep_host_seeds(device_seeds, monkeypatch):
    """Their seed-from-memory kernels spilled registers (build gate): they draw on the host even
    with graph_safe_dropout on, and refuse a CUDA graph capture with dropout (below)."""
    from lorakernels import lora_linear_segmented

    drawn = []
    original = functional.draw_seed
    monkeypatch.setattr(functional, "draw_seed", lambda: drawn.append(original()) or drawn[-1])
    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    lora_linear_segmented(x, weight, bias, [(lora_A, lora_B, 0.5)], torch.tensor([0, -1] * 8), dropout_p=0.3)
    assert len(drawn) == 1


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_capturing_several_adapters_with_dropout_is_refused():
    from lorakernels import lora_linear_segmented

    x, weight, bias, lora_A, lora_B = make_inputs(16, 24, 20, 4, torch.float32)
    rows = torch.tensor([0, -1] * 8, device=DEVICE)
    lora_linear_segmented(x, weight, bias, [(lora_A, lora_B, 0.5)], rows, dropout_p=0.3)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            lora_linear_segmented(x, weight, bias, [(lora_A, lora_B, 0.5)], rows, dropout_p=0.3)
