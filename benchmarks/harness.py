"""Timing, memory and result records shared by the benchmark scripts.

On CUDA: `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed before every run)
gives the median and the 20th/80th percentiles; peak memory is
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. On CPU: wall-clock
medians over repeats (labelled as CPU timings), and no peak-memory figure.

Gradients named in `grad_to_none` are reset before every timed run (outside the timed
region on CUDA), so that a backward allocates its gradients fresh each time instead of
adding into the previous ones: the same work a training step does after
`zero_grad(set_to_none=True)`.
"""

import platform
import statistics
import time

import torch


def environment(device):
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    return dict(device=name, device_type=device.type, torch=torch.__version__, triton=triton.__version__,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _clear_grads(tensors):
    for t in tensors or ():
        t.grad = None


def bench(fn, device, repeats=None, grad_to_none=None, rep_ms=100):
    """(median, p20, p80) seconds of fn().

    CUDA: as many runs as fit in `rep_ms` milliseconds after a 25 ms warm-up (do_bench).
    CPU: `repeats` runs (default 5) after one warm-up.
    """
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=rep_ms, grad_to_none=grad_to_none)
        return tuple(m / 1e3 for m in ms)
    _clear_grads(grad_to_none)
    fn()  # warm-up
    times = []
    for _ in range(repeats or 5):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _median_p20_p80(times)


def bench_calls(fn, device, repeats=None, grad_to_none=None, calls=20):
    """(median, p20, p80) seconds per call of fn() run `calls` times back to back, by the host
    clock with the device synchronized around each batch of calls; `repeats` batches
    (default 10). For calls so small that issuing them is the cost: do_bench flushes the L2
    before every run, GPU work that overlaps the host's preparation of the next call and
    would hide the host time this is meant to measure."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up
        _clear_grads(grad_to_none)
        fn()
    per_call = []
    for _ in range(repeats or 10):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            _clear_grads(grad_to_none)
            fn()
        sync()
        per_call.append((time.perf_counter() - start) / calls)
    return _median_p20_p80(per_call)


def _median_p20_p80(times):
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def peak_memory(fn, device, grad_to_none=None, include_resident=False):
    """Peak bytes allocated while fn() runs (CUDA), or None elsewhere.

    By default the peak above what was allocated before fn() (a layer's activations,
    gradients and temporaries); with include_resident=True the whole peak, everything
    already allocated (weights, optimizer state) included. The gradients in `grad_to_none`
    are released first, so that the figure includes them.
    """
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = 0 if include_resident else torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
