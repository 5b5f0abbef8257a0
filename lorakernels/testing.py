"""Numerics-checking helpers shared by the test suite and `python -m benchmarks`.

Fresh random operands, the replayed dropout mask, reference gradients by autograd in fp64 or
at the inputs' precision, and flash-attention's error rule: a kernel's max error against fp64
is within ERROR_FACTOR times plain PyTorch's at the same precision, plus one rounding step of
the dtype at the output's scale.
"""

import torch

from lorakernels import ops
from lorakernels.autograd import draw_seed
from lorakernels.reference import lora_linear_ref

# A kernel's max error against fp64 may be this many times PyTorch's at the same precision
# (plus one rounding step of the dtype at the output's scale).
ERROR_FACTOR = 3.0


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, leading=None, device=None):
    """Fresh random operands on `device` (default: torch's default device); lora_B is random
    (not zero) so that the LoRA path is exercised."""
    adapter_dtype = adapter_dtype or dtype
    shape = (*leading, K) if leading else (M, K)
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    lora_A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype)
    lora_B = torch.randn(N, r, device=device).to(adapter_dtype)
    return x, weight, b, lora_A, lora_B


def replay_keep_mask(rng_state, M, K, p, backend, device=None):
    """The keep-mask a forward drew after `torch.set_rng_state(rng_state)`: same seed, same mask.

    `device` (default: torch's default device) is where the forward ran.
    """
    if p == 0:
        return None
    device = torch.get_default_device() if device is None else torch.device(device)
    saved = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    seed = int(draw_seed())
    torch.set_rng_state(saved)
    if backend == "triton":
        return ops.dropout_keep_mask(seed, M, K, p, device)
    return ops.torch_keep_mask(seed, M, K, p, device)


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def error_bound(expected64, torch_lowp, dtype):
    """Largest admissible max-abs error: ERROR_FACTOR x PyTorch's at the same precision, plus one
    rounding step of `dtype` at the output's scale (eps / 2 x max|reference|), so that a case where
    PyTorch happens to be exact does not demand the impossible."""
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    return ERROR_FACTOR * max_error(torch_lowp, expected64) + 0.5 * torch.finfo(dtype).eps * scale


def assert_close_to_reference(name, actual, expected64, torch_lowp, dtype):
    """Check `actual` against the fp64 reference with the error rule; verbose on failure.

    Returns the relative error max|actual - ref| / max|ref|.
    """
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if expected64.numel() == 0:
        return
    actual = actual.double()
    bad_values = ~torch.isfinite(actual)
    assert not bad_values.any(), f"{name}: {int(bad_values.sum())} NaN/Inf values"
    err = max_error(actual, expected64)
    torch_err = max_error(torch_lowp, expected64)
    scale = expected64.abs().max().item()
    bound = error_bound(expected64, torch_lowp, dtype)
    if err > bound:
        diff = (actual - expected64).abs()
        idx = (diff > bound).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({dtype}): max error {err:.3e} > bound {bound:.3e} (PyTorch {torch_err:.3e}, scale {scale:.3e}); "
            f"{int((diff > bound).sum())} of {diff.numel()} elements over, first at {idx}")
    return err / max(scale, 1e-30)


def reference_grads(x, weight, bias, lora_A, lora_B, scaling, keep, p, dy, upcast):
    """Reference output and (dx, dA, dB) by autograd.

    upcast=True: everything in fp64 (the accuracy reference). upcast=False: plain PyTorch at
    the precision the kernels promise, x's dtype throughout, fp32 adapters cast to it as
    torch.autocast does for PEFT (the kernels run the rank-R products in x's dtype too).
    """
    if upcast:
        leaves = [t.detach().double() for t in (x, lora_A, lora_B)]
    else:
        leaves = [t.detach().to(x.dtype, copy=True) for t in (x, lora_A, lora_B)]
    leaves = [t.requires_grad_() for t in leaves]
    y = lora_linear_ref(leaves[0], weight, bias, leaves[1], leaves[2], scaling, keep, p, upcast=upcast)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def saved_activation_bytes(run, params):
    """Run `run()` and count the bytes autograd packs for backward, parameters excluded.

    Uses torch.autograd.graph.saved_tensors_hooks; a tensor packed twice counts once.
    Returns (bytes, run's result).
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    seen, total = set(), 0
    for t in packed:
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.untyped_storage().data_ptr() in param_ptrs or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total, out
