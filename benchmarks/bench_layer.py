"""Layer-level benchmarks: every provider on the same inputs, forward / backward / full step,
inference after merge, saved-for-backward bytes, trainable parameters; the merge kernel's
bandwidth against a device-to-device copy; and (CUDA) the fused kernels' GEMM main loop with
the LoRA term switched off against cuBLAS on the same shapes."""

import traceback

import torch

from benchmarks.harness import bench, peak_memory
from benchmarks.providers import make_providers
from lorakernels import LoRALinear, ops
from lorakernels.testing import saved_activation_bytes

MODES = ("forward", "backward", "full")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _record(records, shape, provider, mode, metric, value, p20=None, p80=None, unit="s"):
    M, K, N, r, dropout, dtype = shape
    records.append(dict(benchmark="layer", provider=provider, mode=mode, M=M, K=K, N=N, r=r, dropout=dropout,
                        dtype=dtype_name(dtype), metric=metric, value=value, p20=p20, p80=p80, unit=unit))


def failure(section, what, error):
    """A failed measurement, kept for the report (and the exit status) instead of ending the run."""
    print(f"\nFAILED {section} {what}: {type(error).__name__}: {error}")
    traceback.print_exc()
    return dict(section=section, what=what, error=f"{type(error).__name__}: {error}")


def layer_benchmarks(device, shapes, dtype, providers, repeats, progress=None, failures=None, extras=True,
                     timer=bench):
    """shapes: (tokens M, K, N, r, dropout) tuples. Returns long-format records; a provider that
    fails is reported in `failures` and the others still run. extras=False skips inference
    after merge and the GEMM comparison; `timer` times forward / backward / full (harness.bench,
    or harness.bench_calls where the host's cost is the point)."""
    records = []
    failures = [] if failures is None else failures
    gemm_shapes = set()
    for M, K, N, r, dropout in shapes:
        shape = (M, K, N, r, dropout, dtype)
        layers = make_providers(K, N, r, dtype, dropout, device, names=providers)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        for name, provider in layers.items():
            try:
                records += _provider_benchmarks(device, shape, name, provider, x, dy, repeats, failures, timer)
            except Exception as error:  # noqa: BLE001 - one broken provider must not end a GPU session
                failures.append(failure("layer", f"{name} at {shape}", error))
            if progress:
                progress()
        if not extras:
            continue
        try:
            records += _inference_after_merge(device, shape, layers, x, repeats)
        except Exception as error:  # noqa: BLE001
            failures.append(failure("layer", f"inference after merge at {shape}", error))
        if device.type == "cuda" and (M, K, N) not in gemm_shapes:
            gemm_shapes.add((M, K, N))
            try:
                records += gemm_benchmark(device, M, K, N, dtype)
            except Exception as error:  # noqa: BLE001
                failures.append(failure("gemm", f"at {shape}", error))
        del layers, x, dy
    return records


def _provider_benchmarks(device, shape, name, provider, x, dy, repeats, failures, timer):
    records = []
    module = provider.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [x] + params  # released before every timed run: each backward allocates them fresh
    _record(records, shape, name, "full", "trainable_params", provider.trainable_parameters(), unit="")
    try:  # counted apart from the timings: a compiled module may refuse saved-tensor hooks
        saved, _ = saved_activation_bytes(lambda: module(x), list(module.parameters()))
        _record(records, shape, name, "full", "saved_bytes", saved, unit="B")
    except Exception as error:  # noqa: BLE001
        failures.append(failure("layer", f"{name} saved bytes at {shape}", error))

    def forward():
        return module(x)

    def full():
        module(x).backward(dy)

    y = module(x)

    def backward():
        y.backward(dy, retain_graph=True)

    for mode, fn in (("forward", forward), ("backward", backward), ("full", full)):
        median, p20, p80 = timer(fn, device, repeats, grad_to_none=grads)
        _record(records, shape, name, mode, "time", median, p20, p80)
    mem = peak_memory(full, device, grad_to_none=grads)
    if mem is not None:
        _record(records, shape, name, "full", "peak_memory", mem, unit="B")
    del y
    for t in grads:
        t.grad = None
    return records


@torch.no_grad()
def _inference_after_merge(device, shape, layers, x, repeats):
    """Inference latency: the base layer, LoRA merged (plain GEMM) and the bottleneck adapter."""
    records = []
    for name in ("floor", "lorakernels", "adapter"):
        if name not in layers:
            continue
        module = layers[name].module.eval()
        if isinstance(module, LoRALinear):
            module.merge()
        try:
            median, p20, p80 = bench(lambda: module(x), device, repeats)
        finally:
            if isinstance(module, LoRALinear):
                module.unmerge()
        _record(records, shape, name, "inference-merged", "time", median, p20, p80)
    return records


@torch.no_grad()
def gemm_benchmark(device, M, K, N, dtype, repeats=None):
    """The fused kernels' main loops with the rank-R term switched off (F2: X W^T + b, B2: dY W)
    against cuBLAS (torch.addmm / torch.mm) on the same operands: the ratio the fusion must beat."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    bias = torch.randn(N, device=device, dtype=dtype)
    cases = {
        ("forward", "triton-gemm"): lambda: ops.base_gemm_forward(x, weight, bias),
        ("forward", "cublas"): lambda: torch.addmm(bias, x, weight.t()),
        ("grad-x", "triton-gemm"): lambda: ops.base_gemm_grad_x(dy, weight),
        ("grad-x", "cublas"): lambda: torch.mm(dy, weight),
    }
    torch.testing.assert_close(cases["forward", "triton-gemm"](), cases["forward", "cublas"](), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cases["grad-x", "triton-gemm"](), cases["grad-x", "cublas"](), rtol=2e-2, atol=2e-2)
    records = []
    flops = 2 * M * N * K
    for (mode, provider), fn in cases.items():
        median, p20, p80 = bench(fn, device, repeats)
        rec = dict(benchmark="gemm", provider=provider, mode=mode, M=M, K=K, N=N, r=None, dropout=None,
                   dtype=dtype_name(dtype))
        records.append(dict(rec, metric="time", value=median, p20=p20, p80=p80, unit="s"))
        records.append(dict(rec, metric="tflops", value=flops / median / 1e12, p20=None, p80=None, unit="TFLOP/s"))
    return records


def merge_benchmark(device, N, K, r, dtype, repeats):
    """Merge kernel bandwidth (one read + one write of W) against a device-to-device copy."""
    backend = "triton" if device.type == "cuda" else "torch"
    weight = torch.randn(N, K, device=device, dtype=dtype)
    out = torch.empty_like(weight)
    lora_A = torch.randn(r, K, device=device)
    lora_B = torch.randn(N, r, device=device)
    moved = 2 * weight.numel() * weight.element_size()
    t_merge = bench(lambda: ops.lora_merge(weight, lora_A, lora_B, 1.0, out=out, backend=backend), device, repeats)
    t_copy = bench(lambda: out.copy_(weight), device, repeats)
    base = dict(benchmark="merge", M=None, K=K, N=N, r=r, dropout=None, dtype=dtype_name(dtype),
                mode="merge", p20=None, p80=None)
    return [
        {**base, "provider": f"lorakernels-merge ({backend})", "metric": "time", "value": t_merge[0], "unit": "s",
         "p20": t_merge[1], "p80": t_merge[2]},
        {**base, "provider": f"lorakernels-merge ({backend})", "metric": "bandwidth", "value": moved / t_merge[0] / 1e9,
         "unit": "GB/s"},
        {**base, "provider": "copy", "metric": "time", "value": t_copy[0], "unit": "s", "p20": t_copy[1],
         "p80": t_copy[2]},
        {**base, "provider": "copy", "metric": "bandwidth", "value": moved / t_copy[0] / 1e9, "unit": "GB/s"},
    ]
