"""Triton kernels (layer 1): `@triton.jit` functions only, no torch allocation.

Launchers live in :mod:`lorakernels.ops`.
"""
