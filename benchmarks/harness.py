"""Timing, memory and result records shared by the benchmark scripts.

Providers are timed in alternation: a measurement is a series of rounds, each round times
every provider once (in an order that rotates from round to round), until the Budget is
spent. Each provider's median and 20th/80th percentiles come from all its samples, as order
statistics (never below the fastest sample nor above the slowest); a ratio between two
providers is computed within each round and its median over the rounds is reported, so that
both sides of a ratio are always measured under the same machine conditions.

One sample: on CUDA, one `triton.testing.do_bench` call (CUDA events, warm-up, L2 flushed
before every run) with `return_mode="all"`, which gives every run's time; on CPU, one call
by the wall clock (labelled as CPU timings). Peak memory is `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats` (CUDA only).

Gradients named in `grad_to_none` are reset before every timed run (outside the timed
region on CUDA), so that a backward allocates its gradients fresh each time instead of
adding into the previous ones: the same work a training step does after
`zero_grad(set_to_none=True)`.
"""

import importlib
import math
import platform
import statistics
import sys
import time
from typing import NamedTuple

import torch


def installed(module):
    """Whether `module` (an optional dependency: peft, transformers, bitsandbytes) imports."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class Budget(NamedTuple):
    """How long one measurement runs: rounds go on until there are at least `rounds` of them
    and `seconds` have passed, and never beyond `max_rounds`. On CUDA each round is one
    do_bench call per provider, with `round_ms` milliseconds of timed runs after a warm-up of
    a quarter of that."""

    rounds: int = 10
    seconds: float = 0.0
    round_ms: float = 20.0
    max_rounds: int = 10_000


class Progress:
    """A run's progress on stderr: a line as each measurement finishes, flushed at once (a log then
    shows how far a run got and what took the time), and, where stderr is a terminal and tqdm is
    installed, one bar over the steps of every section (their number given to `expect` ahead).

    `section(name, what)` opens a section, `note(what)` reports a finished measurement of it,
    `step()` a finished step of the bar (a shape, an adapter count, a model variant's part).
    `Progress(lines=False)` (`QUIET`) reports nothing."""

    def __init__(self, lines=True, bar=None, stream=None, clock=time.perf_counter):
        self.stream = stream or sys.stderr
        self.lines, self.clock, self.start = lines, clock, clock()
        self.want_bar = lines and (bar if bar is not None else self.stream.isatty())
        self.bar, self.name, self.total, self.done = None, "", 0, 0

    def expect(self, steps):
        """The run's number of steps, counted ahead: the bar's total."""
        self.total = steps
        if self.want_bar and self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=steps, desc="benchmarks", file=self.stream, leave=False, dynamic_ncols=True)

    def section(self, name, what="started"):
        self.name = name
        if self.bar is not None:
            self.bar.set_description(name)
        self.note(what)

    def note(self, what):
        if not self.lines:
            return
        line = f"[{self.clock() - self.start:7.1f} s] {self.name}: {what}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)  # above the bar, which stays at the bottom
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


QUIET = Progress(lines=False)


def environment(device):
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    return dict(device=name, device_type=device.type, torch=torch.__version__, triton=triton.__version__,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _clear_grads(tensors):
    for t in tensors or ():
        t.grad = None


def quantile(samples, q):
    """The q-quantile of `samples` as an order statistic (nearest rank): always one of the samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(samples):
    """(median, p20, p80) of the samples; p20 and p80 are order statistics, within [min, max]."""
    return statistics.median(samples), quantile(samples, 0.2), quantile(samples, 0.8)


class Timing:
    """One interleaved measurement: `rounds[i][name]` lists the seconds provider `name` took in
    round i; `errors[name]` is the exception that removed a provider (its samples are dropped)."""

    def __init__(self, rounds, errors):
        self.rounds, self.errors = rounds, errors

    def names(self):
        return list(dict.fromkeys(name for samples in self.rounds for name in samples))

    def stats(self, name):
        """(median, p20, p80) seconds over all of the provider's samples."""
        return summarize([t for samples in self.rounds for t in samples.get(name, ())])

    def ratio(self, name, ref):
        """(median, p20, p80) over the rounds of name's time / ref's time in the same round
        (each side the median of its samples in that round); None if they never shared a round."""
        ratios = [statistics.median(r[name]) / statistics.median(r[ref]) for r in self.rounds
                  if name in r and ref in r]
        return summarize(ratios) if ratios else None


def one_call(device, budget, clock=time.perf_counter):
    """A sampler: CUDA, every run of one do_bench call; elsewhere one call by `clock`."""
    if device.type == "cuda":
        import triton.testing

        def sample(fn, grads):
            ms = triton.testing.do_bench(fn, warmup=budget.round_ms / 4, rep=budget.round_ms, grad_to_none=grads,
                                         return_mode="all")
            return [m / 1e3 for m in ms]
        return sample

    def sample(fn, grads):
        _clear_grads(grads)
        start = clock()
        fn()
        return [clock() - start]
    return sample


def call_batches(device, calls=20, clock=time.perf_counter):
    """A sampler: seconds per call of fn() run `calls` times back to back, by the host clock with
    the device synchronized around the batch. For calls so small that issuing them is the cost:
    do_bench flushes the L2 before every run, GPU work that overlaps the host's preparation of
    the next call and would hide the host time this is meant to measure."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sample(fn, grads):
        sync()
        start = clock()
        for _ in range(calls):
            _clear_grads(grads)
            fn()
        sync()
        return [(clock() - start) / calls]
    return sample


def interleave(fns, sample, budget, grads=None, clock=time.perf_counter, warmup=2):
    """Times the callables `fns` ({name: fn}) in rounds, each round sampling every one of them
    once, the order rotated by one each round. A callable that raises is reported in the
    Timing's errors and the others go on. `grads`: {name: tensors whose .grad is reset}."""
    grads = grads or {}
    errors = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                _clear_grads(grads.get(name))
                fn()
        except Exception as error:  # noqa: BLE001 - reported by the caller; the others still run
            errors[name] = error
    active = [name for name in fns if name not in errors]
    rounds, start = [], clock()
    while active and _another_round(len(rounds), clock() - start, budget):
        shift = len(rounds) % len(active)
        samples = {}
        for name in active[shift:] + active[:shift]:
            try:
                samples[name] = sample(fns[name], grads.get(name))
            except Exception as error:  # noqa: BLE001
                errors[name] = error
        active = [name for name in active if name not in errors]
        rounds.append(samples)
    return Timing([{n: s for n, s in samples.items() if n not in errors} for samples in rounds], errors)


def _another_round(done, elapsed, budget):
    return done < budget.max_rounds and (done < budget.rounds or elapsed < budget.seconds)


def bench(fn, device, budget=None, grad_to_none=None, clock=time.perf_counter):
    """(median, p20, p80) seconds of fn() alone, over the rounds of `budget` (default Budget())."""
    budget = budget or Budget()
    timing = interleave({"fn": fn}, one_call(device, budget, clock), budget, {"fn": grad_to_none}, clock)
    if timing.errors:
        raise timing.errors["fn"]
    return timing.stats("fn")


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
