"""Layer-level benchmarks: every provider on the same inputs, forward / backward / full step,
inference after merge, saved-for-backward bytes, trainable parameters, and the merge kernel's
bandwidth against a device-to-device copy."""

import torch

from benchmarks.harness import bench, peak_memory
from benchmarks.providers import make_providers
from lorakernels import LoRALinear, ops
from lorakernels.testing import saved_activation_bytes

MODES = ("forward", "backward", "full")


def _record(records, shape, provider, mode, metric, value, p20=None, p80=None, unit="s"):
    M, K, N, r, dropout, dtype = shape
    records.append(dict(benchmark="layer", provider=provider, mode=mode, M=M, K=K, N=N, r=r, dropout=dropout,
                        dtype=str(dtype).replace("torch.", ""), metric=metric, value=value, p20=p20, p80=p80,
                        unit=unit))


def layer_benchmarks(device, shapes, dtype, providers, repeats, progress=None):
    """shapes: (tokens M, K, N, r, dropout) tuples. Returns long-format records."""
    records = []
    for M, K, N, r, dropout in shapes:
        shape = (M, K, N, r, dropout, dtype)
        layers = make_providers(K, N, r, dtype, dropout, device, names=providers)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        for name, provider in layers.items():
            module = provider.module.train()
            params = [p for p in module.parameters()]
            saved, _ = saved_activation_bytes(lambda: module(x), params)
            _record(records, shape, name, "full", "saved_bytes", saved, unit="B")
            _record(records, shape, name, "full", "trainable_params", provider.trainable_parameters(), unit="")

            def forward():
                return module(x)

            def full():
                module(x).backward(dy)

            y = module(x)

            def backward():
                y.backward(dy, retain_graph=True)

            for mode, fn in (("forward", forward), ("backward", backward), ("full", full)):
                median, p20, p80 = bench(fn, device, repeats)
                _record(records, shape, name, mode, "time", median, p20, p80)
            mem = peak_memory(full, device)
            if mem is not None:
                _record(records, shape, name, "full", "peak_memory", mem, unit="B")
            del y
            x.grad = None
            for p in params:
                p.grad = None
            if progress:
                progress()
        records += _inference_after_merge(device, shape, layers, x, repeats)
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
        median, p20, p80 = bench(lambda: module(x), device, repeats)
        _record(records, shape, name, "inference-merged", "time", median, p20, p80)
        if isinstance(module, LoRALinear):
            module.unmerge()
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
    base = dict(benchmark="merge", M=None, K=K, N=N, r=r, dropout=None, dtype=str(dtype).replace("torch.", ""),
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
