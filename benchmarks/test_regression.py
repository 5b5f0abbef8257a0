"""Regression benchmarks with pytest-benchmark, kept out of the default test run (testpaths = tests):

    pytest benchmarks/test_regression.py --benchmark-only

On CUDA each timed call ends with torch.cuda.synchronize(), so the timer sees the kernels'
time, not the launch. On CPU the layer runs its torch backend (labelled CPU timings).
"""

import pytest
import torch

from benchmarks.providers import make_providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (4096, 4096, 4096, 16) if DEVICE.type == "cuda" else (256, 256, 256, 16)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def synchronized(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("provider", ["floor", "lorakernels", "unfused"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_layer_forward_backward(benchmark, provider, dropout):
    M, K, N, r = SHAPE
    module = make_providers(K, N, r, DTYPE, dropout, DEVICE, names=[provider])[provider].module.train()
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    grads = [x] + [p for p in module.parameters() if p.requires_grad]
    benchmark.extra_info.update(device=str(DEVICE), shape=SHAPE, dtype=str(DTYPE))

    def step():
        for t in grads:  # fresh gradients each step, as after zero_grad(set_to_none=True)
            t.grad = None
        module(x).backward(dy)

    benchmark(synchronized(step))
