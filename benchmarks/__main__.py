"""`python -m benchmarks`: the benchmark suite (see benchmarks/suite.py), the README's main job.

The numerics verification of the kernels runs separately: `python -m benchmarks.verify_numerics`.
"""

from benchmarks.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
