"""`BaseGemm.AUTO`: who runs a frozen GEMM (X W^T in forward, dY W in backward), chosen by measurement.

The fused kernels (F2, B2) save a pass over the output only if their main loop keeps up with
cuBLAS; where it does not, cuBLAS with the LoRA term added in its epilogue (`BaseGemm.CUBLAS`) is
faster. So for each GEMM pass the first call of a kind (pass, token bucket, N, K, dtypes, bias or
dropout, segments, rank bucket, TF32, device) times every strategy that can run it on that call's
own operands, and every later call of that kind runs the fastest, looked up in a table: the
choice costs one dictionary lookup per pass. Candidates: the fused kernel, cuBLAS plus the LoRA
term, and on Hopper the TMA-persistent fused kernel where TMA can address the operands. A 4-bit
base has one strategy (the 4-bit fused kernel).

With LORAKERNELS_TUNING_CACHE set, each choice measured is kept on disk and later processes start
from it (`ops.tuning_store`). Measured only on CUDA tensors outside CUDA graph capture: elsewhere
(the interpreter, a capture with no choice made yet) the fused kernel runs, and nothing is
recorded. Each strategy writes the whole output, so a measured run leaves the output of the last
one, which is then recomputed by the winner: what a call returns never depends on what was timed.
"""

import torch

from lorakernels.ops import tuning_store
from lorakernels.plan import BaseGemm, has_tma

_CHOSEN = {}  # kind -> BaseGemm
MEASURE_WARMUP_MS = 2  # do_bench's warm-up and timing windows per candidate, first call of a kind only
MEASURE_MS = 10


def _measurable(device):
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def time_ms(run):
    """Median milliseconds of `run()` (CUDA events, L2 flushed between runs: `triton.testing.do_bench`)."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=MEASURE_WARMUP_MS, rep=MEASURE_MS, return_mode="median")


def candidates(device, tma_operands):
    """The strategies that can run a pass over a dense W: the fused kernel first (the choice where
    none is measured). A packed W (a 4-bit base) has one: its fused kernel, never measured."""
    if tma_operands and has_tma(device):
        return BaseGemm.TRITON, BaseGemm.CUBLAS, BaseGemm.TRITON_TMA
    return BaseGemm.TRITON, BaseGemm.CUBLAS


def run_chosen(kind, device, options, run):
    """Run `run(strategy)` with the strategy chosen for `kind` (timing `options` on its first call).

    kind: a hashable description of the pass and its operands (see the module docstring).
    options: returns `candidates(...)` (called on the first call of a kind only). run: writes the
    pass's whole output with the given strategy. Returns the strategy that ran.
    """
    chosen = _CHOSEN.get(kind)
    if chosen is None:
        options = options()
        stored = tuning_store.stored_strategy(kind, device) if len(options) > 1 else None
        if stored in {option.value for option in options}:  # a strategy this pass can take
            chosen = _CHOSEN[kind] = BaseGemm(stored)
        elif len(options) == 1 or not _measurable(device):
            chosen = options[0]
            if device.type != "cuda":  # never measurable there (a capture, though, ends)
                _CHOSEN[kind] = chosen
        else:
            timings = {option: time_ms(lambda option=option: run(option)) for option in options}
            chosen = _CHOSEN[kind] = min(options, key=timings.__getitem__)
            tuning_store.store_strategy(kind, device, chosen.value)
    run(chosen)
    return chosen


def chosen_strategies():
    """{kind: strategy} of every choice this process made (measured on CUDA tensors; the fused
    kernel, untimed, for CPU tensors), for reports and tests."""
    return dict(_CHOSEN)
