"""`python -m benchmarks`: the main job.

Until the benchmark suite exists, this runs the numerics verification of the kernels
against the fp64 reference on the default device (see benchmarks/verify_numerics.py).
"""

from benchmarks.verify_numerics import main

if __name__ == "__main__":
    raise SystemExit(main())
