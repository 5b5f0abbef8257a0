"""The host path of a LoRA layer, on any machine: `python -m benchmarks.host_path`.

Every Triton kernel is replaced by a no-op that still goes through lorakernels' whole launch path
(the first launch of each variant through Triton's launch entry, later ones through the bound
launcher, whose compiled launcher is the no-op), so what is timed is the Python a training step
pays per layer before the GPU sees anything: functional layer, autograd, validation, plan,
allocation, argument lists. A GPU adds Triton's C launcher (a few microseconds a launch) on top.
The kernels run through the interpreter's entry point (TRITON_INTERPRET=1 is set here, before
lorakernels is imported), so no GPU is needed; the tensors are tiny CPU tensors, so the torch
allocations and the PEFT baseline's CPU ops cost what their dispatch costs.

Reports, per forward + backward of one layer (16 tokens, K = N = 32, r = 16: one reduction step per
rank-R pass under the interpreter's tiles, as the GPU's tiles take at the suite's host-overhead
shape, so no pass is split and the launches are those a GPU makes): CPU time (min and
median of rounds; `time.process_time`, so other processes on the machine do not inflate it),
the kernel launches, and the Python function calls made inside lorakernels (a count, the same on
every machine). PEFT's `lora.Linear` runs with its real CPU ops at the same tiny shape for scale.
"""

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before lorakernels decorates its kernels

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import lorakernels  # noqa: E402
from lorakernels.ops import specs  # noqa: E402


FEATURES = 32


class _NoOpCompiledKernel:
    """What a compiled variant is to the bound launcher: a launcher (a no-op here) and its handles."""

    function = None
    packed_metadata = None

    def __init__(self):
        self.launches = 0

    def run(self, *arguments):
        self.launches += 1

    def launch_metadata(self, grid, stream, *arguments):
        return None


def stub_kernels():
    """Every kernel launch from now on in this process is a no-op; returns the stub (counts launches)."""
    stub = _NoOpCompiledKernel()

    def run(self, *arguments, grid, warmup, **kwargs):
        stub.launches += 1
        return stub

    InterpretedFunction.run = run
    specs._current_stream = lambda: 0
    return stub


def _layer_step(dropout, backend="triton"):
    torch.manual_seed(0)
    layer = lorakernels.LoRALinear(FEATURES, FEATURES, r=16, lora_alpha=16, lora_dropout=dropout, backend=backend)
    x = torch.randn(16, FEATURES, requires_grad=True)

    def step():
        y = layer(x)
        y.backward(torch.ones_like(y))
    return step


def _peft_step(dropout, patched):
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(FEATURES, FEATURES)),
                                peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout, target_modules=["0"]))
    if patched:
        lorakernels.patch_peft(model, backend="triton")
    x = torch.randn(16, FEATURES, requires_grad=True)

    def step():
        y = model(x)
        y.backward(torch.ones_like(y))
    return step


def _python_calls(step, repeats=20):
    """Python function calls made in lorakernels' own files per step (deterministic)."""
    root = os.path.dirname(lorakernels.__file__)
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(root):
            calls += 1

    sys.setprofile(profile)
    try:
        for _ in range(repeats):
            step()
    finally:
        sys.setprofile(None)
    return calls / repeats


def measure(step, stub, rounds=15, calls=200):
    for _ in range(50):  # first launches compile (here: bind) each variant
        step()
    launches = stub.launches
    step()
    launches = stub.launches - launches
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            step()
        samples.append((time.process_time() - start) / calls * 1e6)
    samples.sort()
    return dict(min_us=samples[0], median_us=samples[len(samples) // 2], launches=launches,
                python_calls=_python_calls(step))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    stub = stub_kernels()
    cases = [("LoRALinear, p = 0.1", lambda: _layer_step(0.1)), ("LoRALinear, p = 0", lambda: _layer_step(0.0))]
    try:
        import peft  # noqa: F401
        cases += [("PEFT lora.Linear patched, p = 0.1", lambda: _peft_step(0.1, True)),
                  ("PEFT lora.Linear (its CPU ops), p = 0.1", lambda: _peft_step(0.1, False))]
    except ImportError:
        print("peft is not installed: the PEFT rows are left out")
    print(f"host path of one layer's forward + backward (16 x {FEATURES} -> {FEATURES}, r = 16), kernels stubbed; "
          f"torch {torch.__version__}")
    print(f"{'case':42} {'min us':>8} {'median us':>10} {'launches':>9} {'lorakernels calls':>18}")
    for name, build in cases:
        r = measure(build(), stub, rounds=args.rounds)
        calls = f"{r['python_calls']:.0f}" if "LoRALinear" in name or "patched" in name else "-"
        print(f"{name:42} {r['min_us']:8.1f} {r['median_us']:10.1f} {r['launches']:9d} {calls:>18}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
