"""Kernel specs against their kernels: a spec that disagrees with its kernel fails here, before a
launcher passes arguments in the wrong order or the build gate types one wrongly."""

import inspect

import pytest
import torch
import triton.language as tl

from lorakernels.ops import specs
from lorakernels.ops.configs import PADDED_RANKS


def _parameters(kernel):
    """(name, is_constexpr) of a kernel's parameters, compiled or interpreted alike."""
    return [(name, p.annotation is tl.constexpr) for name, p in inspect.signature(kernel.fn).parameters.items()]


def _constexpr_names(kernel):
    return {name for name, constexpr in _parameters(kernel) if constexpr}


@pytest.mark.parametrize("spec", specs.ALL, ids=[s.code for s in specs.ALL])
def test_spec_names_every_runtime_argument_in_the_kernels_order(spec):
    runtime = [name for name, constexpr in _parameters(spec.kernel) if not constexpr]
    assert [a.name for a in spec.args] == runtime


@pytest.mark.parametrize("spec", specs.ALL, ids=[s.code for s in specs.ALL])
def test_spec_constexprs_are_the_kernels(spec):
    """Feature flags, case constexprs and every config's block sizes are exactly the kernel's constexprs."""
    ranks = PADDED_RANKS if "R_PAD" in spec.case_constexprs else (None,)
    configs = [c for r in ranks for eb in (2, 4) for c in spec.configs(eb, r)] + [spec.interpreter_config]
    for config in configs:
        blocks = {k for k in config if k not in ("num_warps", "num_stages")}
        assert blocks | set(spec.flags) | set(spec.case_constexprs) == _constexpr_names(spec.kernel), config


@pytest.mark.parametrize("spec", specs.ALL, ids=[s.code for s in specs.ALL])
def test_strides_name_a_tensor_of_the_spec(spec):
    tensors = {a.tensor for a in spec.args if isinstance(a, (specs.Ptr, specs.Desc))}
    assert all(a.tensor in tensors for a in spec.args if isinstance(a, specs.Stride))


def test_a_launch_with_a_missing_or_unknown_argument_is_refused():
    out = torch.empty(4, 8, dtype=torch.int8)
    grid = lambda meta: (1, 1)  # noqa: E731
    with pytest.raises(TypeError, match=r"missing \['p'\], unexpected \['q'\]"):
        specs.DROPOUT_MASK.launch(grid, out=out, M=4, K=8, seed=1, q=0.5)


def test_b1_flag_paths_follow_the_fused_db_rank_limit():
    """(COMPUTE_V, COMPUTE_DB, SEGMENTED): dB rides along only up to FUSED_DB_MAX_RANK, with or without segments."""
    both = (True, False)
    assert {tuple(c.values()) for c in specs.B1.flag_combinations(16)} == {
        (v, db, seg) for v, db in ((True, True), (True, False), (False, True)) for seg in both}
    assert [tuple(c.values()) for c in specs.B1.flag_combinations(64)] == [(True, False, True), (True, False, False)]


def test_gemm_autotuning_is_per_token_bucket():
    """F2/B2 configs are chosen per power-of-two token bucket, not once for every M."""
    assert [specs.token_bucket(m) for m in (1, 64, 65, 4096, 4097, 10**6)] == [64, 64, 128, 4096, 8192, 16384]
    assert specs.F2.autotuner(3000, 2) is specs.F2.autotuner(4096, 2)
    assert specs.F2.autotuner(4096, 2) is not specs.F2.autotuner(8192, 2)
    assert specs.F2.autotuner(4096, 2) is not specs.B2.autotuner(4096, 2)
