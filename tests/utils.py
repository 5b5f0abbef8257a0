"""Shared test helpers: inputs, the replayed dropout mask, and the error rule.

Error rule (flash-attention's): a kernel's max error against the fp64 reference must be
within ERROR_FACTOR times the error of plain PyTorch at the same precision, plus one
rounding step of the output's dtype at the output's scale (so that a case where PyTorch
happens to be exact does not demand the impossible). Garbage, a missing term, a wrong
scale or a wrong mask exceed it by orders of magnitude.
"""

import torch

from lorakernels import lora_linear_ref, ops
from lorakernels.functional import draw_seed

ERROR_FACTOR = 3.0


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, leading=None, device="cpu"):
    """Fresh random operands; lora_B is random (not zero) so that the LoRA path is exercised."""
    adapter_dtype = adapter_dtype or dtype
    shape = (*leading, K) if leading else (M, K)
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    lora_A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype)
    lora_B = torch.randn(N, r, device=device).to(adapter_dtype)
    return x, weight, b, lora_A, lora_B


def replay_keep_mask(rng_state, M, K, p, backend):
    """The keep-mask a forward drew after `torch.set_rng_state(rng_state)`: same seed, same mask."""
    if p == 0:
        return None
    saved = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    seed = draw_seed()
    torch.set_rng_state(saved)
    if backend == "triton":
        return ops.dropout_keep_mask(seed, M, K, p, "cpu")
    return ops.torch_keep_mask(seed, M, K, p, "cpu")


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def assert_close_to_reference(name, actual, expected64, torch_lowp, dtype):
    """Check `actual` against the fp64 reference with the error rule above; verbose on failure."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if expected64.numel() == 0:
        return
    actual = actual.double()
    bad_values = ~torch.isfinite(actual)
    assert not bad_values.any(), f"{name}: {int(bad_values.sum())} NaN/Inf values"
    err = max_error(actual, expected64)
    torch_err = max_error(torch_lowp, expected64)
    scale = expected64.abs().max().item()
    bound = ERROR_FACTOR * torch_err + torch.finfo(dtype).eps * scale
    if err > bound:
        diff = (actual - expected64).abs()
        idx = (diff > bound).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({dtype}): max error {err:.3e} > bound {bound:.3e} (PyTorch {torch_err:.3e}, scale {scale:.3e}); "
            f"{int((diff > bound).sum())} of {diff.numel()} elements over, first at {idx}")
    return err / max(scale, 1e-30)


def reference_grads(x, weight, bias, lora_A, lora_B, scaling, keep, p, dy, upcast):
    """Reference output and (dx, dA, dB) by autograd: fp64 when upcast, else at the inputs' precision."""
    leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (x, lora_A, lora_B)]
    y = lora_linear_ref(leaves[0], weight, bias, leaves[1], leaves[2], scaling, keep, p, upcast=upcast)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]
