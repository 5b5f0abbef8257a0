"""Dropout: statistics, consistency between forward and backward, reproducibility.

No golden masks: Philox streams differ between Triton versions. Each test would catch a
mask that is stored instead of regenerated inconsistently, a wrong keep probability, a
tiling-dependent mask, words of one Philox call shared or repeated between elements, or a seed
that torch.manual_seed / checkpointing cannot replay.
"""

import pytest
import torch
import torch.utils.checkpoint as checkpoint

from lorakernels import LoRALinear, lora_linear, ops
from lorakernels.ops import configs, specs
from tests.utils import DEVICE, replay_keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropped_fraction_near_p(p):
    M, K = 256, 512  # 131072 draws: the std of the fraction is <= 0.0014, the bound is 5 std
    mask = ops.dropout_keep_mask(1234, M, K, p, DEVICE)
    n = mask.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5
    assert abs((1 - mask.float().mean().item()) - p) < tolerance
    # Rows and columns are not correlated in an obvious way: each row's and column's rate is sane.
    assert (1 - mask.float().mean(1)).sub(p).abs().max() < 0.12
    assert (1 - mask.float().mean(0)).sub(p).abs().max() < 0.15
    # Each of the four words of a Philox call (column k % 4) drops with probability p (32768 each).
    per_word = 1 - mask.view(M, K // 4, 4).float().mean((0, 1))
    assert per_word.sub(p).abs().max() < 5 * (p * (1 - p) / (n // 4)) ** 0.5


def test_mask_elements_are_independent_within_groups_and_across_rows():
    """One Philox call decides 4 neighbouring columns, one word each. Would catch a word shared by
    two columns of a group (or copied between them), a counter that misses the row or the group
    (rows or groups repeating), or words correlated with their neighbours."""
    M, K = 256, 512
    keep = ops.dropout_keep_mask(77, M, K, 0.5, DEVICE)
    # Exact: all rows differ, all columns differ (two equal independent 256-bit columns: 2^-256).
    assert torch.unique(keep, dim=0).shape[0] == M
    assert torch.unique(keep, dim=1).shape[1] == K
    # All 16 patterns of a group of 4 columns, each 1/16 of the time (32768 groups: std 0.0013).
    groups = keep.view(M, K // 4, 4).long()
    patterns = (groups * torch.tensor([1, 2, 4, 8], device=keep.device)).sum(-1)
    freq = torch.bincount(patterns.flatten(), minlength=16).float() / patterns.numel()
    assert (freq - 1 / 16).abs().max() < 0.01, freq
    # At p = 0.5 independent neighbours agree half of the time (>= 130560 pairs: std <= 0.0014).
    neighbours = {
        "columns k, k+1 (mostly in one group)": (keep[:, :-1], keep[:, 1:]),
        "columns k, k+4 (same word, next group)": (keep[:, :-4], keep[:, 4:]),
        "rows m, m+1": (keep[:-1], keep[1:]),
        "rows m, m+1, columns k, k+1": (keep[:-1, :-1], keep[1:, 1:]),
    }
    for name, (a, b) in neighbours.items():
        agree = (a == b).float().mean().item()
        assert abs(agree - 0.5) < 0.01, (name, agree)


def test_mask_depends_on_seed_and_not_on_tiling(monkeypatch):
    a = ops.dropout_keep_mask(1, 64, 100, 0.5, DEVICE)
    assert torch.equal(a, ops.dropout_keep_mask(1, 64, 100, 0.5, DEVICE))
    assert not torch.equal(a, ops.dropout_keep_mask(2, 64, 100, 0.5, DEVICE))
    # A different tiling of the same logical (M, K) matrix yields the same mask. The spec holds
    # the config dict itself: change it in place.
    monkeypatch.setitem(configs.DROPOUT_MASK_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(configs.DROPOUT_MASK_CONFIG, "BLOCK_K", 128)
    assert specs.DROPOUT_MASK.fixed_config(1)["BLOCK_K"] == 128
    assert torch.equal(a, ops.dropout_keep_mask(1, 64, 100, 0.5, DEVICE))


def _kernel_masks(M, K, p, base_gemm):
    """The keep-masks the kernels applied in one layer's forward and backward, and the mask
    `ops.dropout_keep_mask` gives for the seed that forward drew. W = 0, A = B = I (rank K),
    scaling 1, x > 0: y = Xd (F1's mask: y != 0); with dy = 1, dX = keep / (1 - p) (B2's); with
    dy = [I_M | 0], dA[:M] = Xd (B3's). K >= M."""
    x = torch.rand(M, K, device=DEVICE, dtype=torch.float16) + 1.0
    weight = torch.zeros(K, K, device=DEVICE, dtype=torch.float16)
    eye = torch.eye(K, device=DEVICE, dtype=torch.float16)
    rng_state = torch.get_rng_state()

    def layer(dy):
        torch.set_rng_state(rng_state)
        xg, a, b = x.clone().requires_grad_(), eye.clone().requires_grad_(), eye.clone().requires_grad_()
        y = lora_linear(xg, weight, None, a, b, 1.0, p, backend="triton", base_gemm=base_gemm)
        y.backward(dy)
        return y.detach(), xg.grad, a.grad

    y, dx, _ = layer(torch.ones(M, K, device=DEVICE, dtype=torch.float16))
    _, _, da = layer(torch.eye(M, K, device=DEVICE, dtype=torch.float16))
    expected = replay_keep_mask(rng_state, M, K, p, "triton", DEVICE)
    return {"F1": y != 0, "B2": dx != 0, "B3": da[:M] != 0}, expected


@pytest.mark.parametrize("base_gemm", ["triton", "triton-tma"])
def test_kernels_apply_the_mask_of_dropout_keep_mask_at_any_tiling(monkeypatch, base_gemm):
    """F1 (forward), B2's epilogue (dX; the TMA kernel with triton-tma) and B3 (dA) regenerate the
    mask `ops.dropout_keep_mask` materializes, at the interpreter's tiles and at others (column
    tiles of 16 to 128, ragged last tiles). Would catch a mask that depends on a kernel's tile
    (a counter relative to the tile, a group of 4 columns split by a tile edge, another word
    order) or that one kernel regenerates differently from the others."""
    M, K, p = 37, 96, 0.5
    masks, expected = _kernel_masks(M, K, p, base_gemm)
    assert 0.4 < expected.float().mean() < 0.6
    for name, mask in masks.items():
        assert torch.equal(mask, expected), name
    # Other tiles: F1 and B3 columns 64 wide (interpreter: 32), the GEMMs' columns 32 wide (64).
    monkeypatch.setitem(configs.INTERPRETER_RANK_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(configs.INTERPRETER_RANK_CONFIG, "BLOCK_K", 64)
    monkeypatch.setitem(configs.INTERPRETER_GEMM_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(configs.INTERPRETER_GEMM_CONFIG, "BLOCK_N", 32)
    assert specs.F1.interpreter_config["BLOCK_K"] == 64 and specs.B2.interpreter_config["BLOCK_N"] == 32
    masks, expected = _kernel_masks(M, K, p, base_gemm)
    for name, mask in masks.items():
        assert torch.equal(mask, expected), f"{name} at other tiles"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_and_backward_use_one_mask(backend):
    """With W = 0, B = I and s = 1: y = Xd A^T. With A = I, y = Xd and dx = dy * keep / (1-p):
    the zeros of y and of dx must sit at the same places, and nonzeros scaled by 1/(1-p)."""
    K, p = 40, 0.5
    x = torch.rand(33, K) + 1.0  # strictly positive: a zero in y means dropped
    weight = torch.zeros(K, K)
    lora_A = torch.eye(K).requires_grad_()
    lora_B = torch.eye(K).requires_grad_()
    x.requires_grad_()
    y = lora_linear(x, weight, None, lora_A, lora_B, 1.0, p, backend=backend)
    y.backward(torch.ones_like(y))
    kept_fwd = y.detach() != 0
    kept_bwd = x.grad != 0
    assert 0.3 < kept_fwd.float().mean() < 0.7
    assert torch.equal(kept_fwd, kept_bwd)
    torch.testing.assert_close(y.detach()[kept_fwd], x.detach()[kept_fwd] / (1 - p))
    torch.testing.assert_close(x.grad[kept_bwd], torch.full_like(x.grad[kept_bwd], 1 / (1 - p)))
    # dA = V^T Xd uses the same mask: with dy = 1 and B = I, dA[r, k] = sum_m Xd[m, k].
    torch.testing.assert_close(lora_A.grad, (x.detach() * kept_fwd / (1 - p)).sum(0).expand(K, K), rtol=1e-5,
                               atol=1e-5)


def _dropout_layer(backend):
    layer = LoRALinear(24, 20, r=4, lora_alpha=8, lora_dropout=0.5, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_manual_seed_reproduces_and_calls_differ(backend):
    layer = _dropout_layer(backend)
    x = torch.randn(16, 24)
    torch.manual_seed(3)
    first = layer(x)
    second = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # no dropout in eval mode


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpoint_recompute_replays_the_mask(backend, use_reentrant):
    """Gradients through torch.utils.checkpoint equal the unchecked run bit for bit."""
    layer = _dropout_layer(backend)
    x = torch.randn(2, 9, 24, requires_grad=True)

    def grads(run):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        run().pow(2).sum().backward()
        return [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]

    plain = grads(lambda: layer(x))
    checkpointed = grads(lambda: checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def test_layers_draw_independent_masks():
    first, second = _dropout_layer("triton"), _dropout_layer("triton")
    second.load_state_dict(first.state_dict())
    x = torch.randn(16, 24)
    assert not torch.equal(first(x), second(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seed_and_scalars_stay_on_cpu_under_another_default_device(backend):
    """torch.set_default_device / a device context must not move the seed off the CPU generator:
    the same manual_seed gives the same output and gradients inside a `torch.device("meta")` block."""
    layer = _dropout_layer(backend)
    x = torch.randn(16, 24, requires_grad=True)

    def run():
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = layer(x)
        y.pow(2).sum().backward()
        return [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]

    expected = run()
    with torch.device("meta"):
        actual = run()
    for a, b in zip(actual, expected):
        assert a.device == b.device and torch.equal(a, b)
