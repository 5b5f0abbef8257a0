"""Layer-level benchmarks: every provider on the same inputs, forward / backward / full step,
inference after merge, saved-for-backward bytes, trainable parameters; the merge kernel's
bandwidth against a device-to-device copy; and (CUDA) the fused kernels' GEMM main loop with
the LoRA term switched off against cuBLAS on the same shapes."""

import functools
import traceback

import torch

from benchmarks.harness import QUIET, Budget, call_batches, interleave, one_call, peak_memory
from benchmarks.providers import make_providers
from lorakernels import LoRALinear, ops
from lorakernels.ops.lora_linear import tma_addressable
from lorakernels.plan import resolve_plan
from lorakernels.testing import saved_activation_bytes

MODES = ("forward", "backward", "full")
# Every provider's time is also reported as a ratio to these, computed round by round.
LAYER_REFERENCES = ("floor", "unfused", "peft", "lorakernels-cublas", "lorakernels-tma")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _record(records, shape, provider, mode, metric, value, p20=None, p80=None, unit="s", benchmark="layer"):
    M, K, N, r, dropout, dtype = shape
    records.append(dict(benchmark=benchmark, provider=provider, mode=mode, M=M, K=K, N=N, r=r, dropout=dropout,
                        dtype=dtype_name(dtype), metric=metric, value=value, p20=p20, p80=p80, unit=unit))


def shape_text(M, K, N, r, dropout, *_):
    """A shape as progress lines and failures name it."""
    return f"M={M} K={K} N={N} r={r} p={dropout}"


def failure(section, what, error):
    """A failed measurement, kept for the report (and the exit status) instead of ending the run."""
    print(f"\nFAILED {section} {what}: {type(error).__name__}: {error}")
    traceback.print_exception(type(error), error, error.__traceback__)
    return dict(section=section, what=what, error=f"{type(error).__name__}: {error}")


def layer_benchmarks(device, shapes, dtype, providers, budget, progress=QUIET, failures=None, extras=True,
                     calls=None):
    """shapes: (tokens M, K, N, r, dropout) tuples. Returns long-format records; a provider that
    fails is reported in `failures` and the others still run. Each mode times the providers in
    alternation (harness.interleave). extras=False skips inference after merge and the GEMM
    comparison; `calls`: time batches of that many back-to-back calls by the host clock
    (harness.call_batches, where the host's cost is the point) instead of single calls.
    `progress` (a harness.Progress): a line per measurement, a step per shape."""
    records = []
    failures = [] if failures is None else failures
    sample = call_batches(device, calls) if calls else one_call(device, budget)
    gemm_shapes = set()
    for M, K, N, r, dropout in shapes:
        try:
            records += _one_shape(device, (M, K, N, r, dropout, dtype), providers, budget, sample, failures, extras,
                                  gemm_shapes, progress)
        finally:
            progress.step()
    return records


def _one_shape(device, shape, providers, budget, sample, failures, extras, gemm_shapes, progress):
    M, K, N, r, dropout, dtype = shape
    progress.note(f"{shape_text(*shape)}: building the providers")
    try:
        layers = make_providers(K, N, r, dtype, dropout, device, names=providers)
    except Exception as error:  # noqa: BLE001 - the other shapes still run
        failures.append(failure("layer", f"providers at {shape}", error))
        return []
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    records = _shape_benchmarks(device, shape, layers, x, dy, budget, sample, failures, progress=progress)
    if not extras:
        return records
    try:
        records += _inference_after_merge(device, shape, layers, x, budget)
        progress.note(f"{shape_text(*shape)} inference-merged")
    except Exception as error:  # noqa: BLE001
        failures.append(failure("layer", f"inference after merge at {shape}", error))
    if device.type == "cuda" and (M, K, N) not in gemm_shapes:
        gemm_shapes.add((M, K, N))
        try:
            records += gemm_benchmark(device, M, K, N, dtype, budget)
            progress.note(f"M={M} K={K} N={N}: GEMM main loop against cuBLAS")
        except Exception as error:  # noqa: BLE001
            failures.append(failure("gemm", f"at {shape}", error))
    return records


def _shape_benchmarks(device, shape, layers, x, dy, budget, sample, failures, references=LAYER_REFERENCES,
                      benchmark="layer", progress=QUIET, label=None):
    """Every provider at one shape: counts and saved bytes, then each mode's timings with the
    providers in alternation (each one's ratios to `references`; a progress line each, naming the
    shape or `label`), then peak memory. A provider that fails leaves the later modes. Records are
    tagged `benchmark`."""
    records, modules = [], {}
    for name, provider in layers.items():
        modules[name] = provider.module.train()
        records += _counts(shape, name, provider, x, failures, benchmark)
    # released before every timed run: each backward allocates them fresh
    grads = {name: [x] + [p for p in m.parameters() if p.requires_grad] for name, m in modules.items()}
    for mode in MODES:
        fns = {}
        for name, module in modules.items():
            try:
                fns[name] = _mode_fn(mode, module, x, dy)
            except Exception as error:  # noqa: BLE001 - one broken provider must not end a GPU session
                failures.append(failure(benchmark, f"{name} {mode} at {shape}", error))
        timing = interleave(fns, sample, budget, grads)
        records += _timing_records(shape, benchmark, mode, timing, references)
        for name, error in timing.errors.items():
            failures.append(failure(benchmark, f"{name} {mode} at {shape}", error))
        progress.note(f"{label or shape_text(*shape)} {mode}: {len(timing.names())} providers, "
                      f"{len(timing.rounds)} round{'s' if len(timing.rounds) != 1 else ''}" + (f", {len(timing.errors)} FAILED" if timing.errors else ""))
        modules = {name: m for name, m in modules.items() if name in timing.names()}
        del fns, timing
    for name, module in modules.items():
        try:
            mem = peak_memory(lambda: module(x).backward(dy), device, grad_to_none=grads[name])
        except Exception as error:  # noqa: BLE001
            failures.append(failure(benchmark, f"{name} peak memory at {shape}", error))
            continue
        if mem is not None:
            _record(records, shape, name, "full", "peak_memory", mem, unit="B", benchmark=benchmark)
    for t in [x] + [t for ts in grads.values() for t in ts]:
        t.grad = None
    return records


def _counts(shape, name, provider, x, failures, benchmark="layer"):
    """Trainable parameters and the bytes autograd saves for backward."""
    records = []
    _record(records, shape, name, "full", "trainable_params", provider.trainable_parameters(), unit="",
            benchmark=benchmark)
    module = provider.module
    try:  # counted apart from the timings: a compiled module may refuse saved-tensor hooks
        saved, _ = saved_activation_bytes(lambda: module(x), list(module.parameters()))
        _record(records, shape, name, "full", "saved_bytes", saved, unit="B", benchmark=benchmark)
    except Exception as error:  # noqa: BLE001
        failures.append(failure(benchmark, f"{name} saved bytes at {shape}", error))
    return records


def _mode_fn(mode, module, x, dy):
    """The callable that one mode times: forward, backward (of a graph kept for it) or both."""
    if mode == "forward":
        return lambda: module(x)
    if mode == "full":
        return lambda: module(x).backward(dy)
    y = module(x)
    return lambda: y.backward(dy, retain_graph=True)


def _timing_records(shape, benchmark, mode, timing, references):
    """Each provider's median time with its 20/80th percentiles, and its per-round ratios to the
    references timed in the same rounds (metric ratio_to_<reference>: median and percentiles
    over the rounds)."""
    records = []
    for name in timing.names():
        _record(records, shape, name, mode, "time", *timing.stats(name), benchmark=benchmark)
        for ref in references:
            ratio = timing.ratio(name, ref) if ref != name else None
            if ratio is not None:
                _record(records, shape, name, mode, f"ratio_to_{ref}", *ratio, unit="x", benchmark=benchmark)
    return records


GRAPHED_PROVIDERS = ("floor", "lorakernels", "peft", "peft-patched")


def graphed_benchmarks(device, shape, dtype, providers, budget, calls, progress=QUIET, failures=None):
    """Forward + backward of each provider captured once in a CUDA graph, then replayed back to back
    (mode `full-graphed`): what a step costs once the host is out of the way (`torch.cuda.graph`
    after three warm-up steps on a side stream, which compile, autotune and choose the GEMM
    strategies; lorakernels draws its dropout seeds on the device under capture, PEFT's dropout
    uses PyTorch's graph-safe generator). CUDA only; providers outside GRAPHED_PROVIDERS are left out."""
    failures = [] if failures is None else failures
    M, K, N, r, dropout = shape
    layers = make_providers(K, N, r, dtype, dropout, device, names=[n for n in providers if n in GRAPHED_PROVIDERS])
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    replays = {}
    for name, provider in layers.items():
        module = provider.module.train()

        def step(module=module):
            module(x).backward(dy)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            replays[name] = graph.replay
        except Exception as error:  # noqa: BLE001 - reported; the other providers still run
            failures.append(failure("overhead", f"{name} captured in a CUDA graph at {shape}", error))
    timing = interleave(replays, call_batches(device, calls), budget)
    for name, error in timing.errors.items():
        failures.append(failure("overhead", f"{name} graph replay at {shape}", error))
    progress.note(f"{shape_text(M, K, N, r, dropout, dtype)} full-graphed: {len(timing.names())} providers")
    return _timing_records((M, K, N, r, dropout, dtype), "overhead", "full-graphed", timing, ("floor", "peft"))


@torch.no_grad()
def _inference_after_merge(device, shape, layers, x, budget):
    """Inference latency: the base layer, LoRA merged (plain GEMM) and the bottleneck adapter,
    timed in alternation."""
    modules = {name: layers[name].module.eval() for name in ("floor", "lorakernels", "adapter") if name in layers}
    merged = [m for m in modules.values() if isinstance(m, LoRALinear)]
    for module in merged:
        module.merge()
    try:
        timing = interleave({name: (lambda m=m: m(x)) for name, m in modules.items()}, one_call(device, budget),
                            budget)
    finally:
        for module in merged:
            module.unmerge()
    if timing.errors:
        raise next(iter(timing.errors.values()))
    return _timing_records(shape, "layer", "inference-merged", timing, ("floor",))


@torch.no_grad()
def gemm_benchmark(device, M, K, N, dtype, budget=None):
    """The fused kernels' main loops with the rank-R term switched off (F2: X W^T + b, B2: dY W)
    against cuBLAS (torch.addmm / torch.mm) on the same operands, in alternation: the ratio the
    fusion must beat. On sm_90 the TMA-persistent kernels (`triton-tma-gemm`) are timed too."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    bias = torch.randn(N, device=device, dtype=dtype)
    strategies = {"triton-gemm": resolve_plan(device, "triton", "triton")}
    tma = resolve_plan(device, "triton", "triton-tma")
    if tma.tma and tma_addressable(x, weight, dy):
        strategies["triton-tma-gemm"] = tma
    cases = {
        "forward": {**{name: functools.partial(ops.base_gemm_forward, x, weight, bias, plan=plan)
                       for name, plan in strategies.items()}, "cublas": lambda: torch.addmm(bias, x, weight.t())},
        "grad-x": {**{name: functools.partial(ops.base_gemm_grad_x, dy, weight, plan=plan)
                      for name, plan in strategies.items()}, "cublas": lambda: torch.mm(dy, weight)},
    }
    for fns in cases.values():
        for name in strategies:
            torch.testing.assert_close(fns[name](), fns["cublas"](), rtol=2e-2, atol=2e-2)
    budget = budget or Budget()
    records = []
    for mode, fns in cases.items():
        timing = interleave(fns, one_call(device, budget), budget)
        if timing.errors:
            raise next(iter(timing.errors.values()))
        records += _timing_records((M, K, N, None, None, dtype), "gemm", mode, timing, ("cublas",))
    flops = 2 * M * N * K
    return records + [dict(rec, metric="tflops", value=flops / rec["value"] / 1e12, p20=None, p80=None,
                           unit="TFLOP/s") for rec in records if rec["metric"] == "time"]


def merge_benchmark(device, N, K, r, dtype, budget):
    """Merge kernel bandwidth (one read + one write of W) against a device-to-device copy, the
    two in alternation."""
    backend = "triton" if device.type == "cuda" else "torch"
    weight = torch.randn(N, K, device=device, dtype=dtype)
    out = torch.empty_like(weight)
    lora_A = torch.randn(r, K, device=device)
    lora_B = torch.randn(N, r, device=device)
    moved = 2 * weight.numel() * weight.element_size()
    merge = f"lorakernels-merge ({backend})"
    timing = interleave({merge: lambda: ops.lora_merge(weight, lora_A, lora_B, 1.0, out=out, backend=backend),
                         "copy": lambda: out.copy_(weight)}, one_call(device, budget), budget)
    if timing.errors:
        raise next(iter(timing.errors.values()))
    records = _timing_records((None, K, N, r, None, dtype), "merge", "merge", timing, ("copy",))
    return records + [dict(rec, metric="bandwidth", value=moved / rec["value"] / 1e9, p20=None, p80=None,
                           unit="GB/s") for rec in records if rec["metric"] == "time"]
