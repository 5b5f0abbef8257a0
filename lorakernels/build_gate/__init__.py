"""The ahead-of-time build gate: every kernel variant a launcher can choose, built for real GPUs.

Not part of the runtime: nothing in the package imports it. `variants.py` generates the
variants from the kernel specs (`lorakernels.ops.specs`), `aot.py` builds them for sm_90 and
sm_80 on a machine without a GPU and judges them (shared memory, spills, tensor-core MMA).

    python -m lorakernels.build_gate [--output-dir benchmarks/results] [--json PATH] [--jobs N]
"""
