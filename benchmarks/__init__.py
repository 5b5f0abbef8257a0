"""Benchmarks and verification scripts for lorakernels (`python -m benchmarks`)."""
