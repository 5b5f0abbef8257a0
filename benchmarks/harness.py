"""Timing, memory and result records shared by the benchmark scripts.

On CUDA: `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between runs) gives
the median and the 20th/80th percentiles; peak memory is `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats`. On CPU: wall-clock medians over repeats (labelled as CPU
timings), and no peak-memory figure.
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


def bench(fn, device, repeats=None):
    """(median, p20, p80) seconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=repeats or 100)
        return tuple(m / 1e3 for m in ms)
    fn()  # warm-up
    times = []
    for _ in range(repeats or 5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def peak_memory(fn, device):
    """Peak bytes allocated while fn() runs (CUDA), or None."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
