"""Bound launches: after a variant's first launch through Triton's JIT, the compiled kernel is
launched directly (`ops.specs.BoundLaunch`). A GPU is what runs compiled kernels, so here the JIT
returns a recording stand-in for the compiled kernel: these tests catch a bound launch that passes
arguments in another order or number than Triton's own launch would, runs a variant it was not
compiled for (another alignment, dtype, size class, device or token bucket), or skips the checks
a first launch makes."""

import inspect

import pytest
import torch

from lorakernels.ops import configs, specs

KERNEL_CLASS = type(specs.F1.kernel)  # the interpreter's InterpretedFunction, or a JITFunction


class RecordingCompiledKernel:
    """What the JIT returns for a compiled variant: its launcher records the calls."""

    function = "cu-function"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.launches = []

    def run(self, *arguments):
        self.launches.append(arguments)

    def launch_metadata(self, grid, stream, *arguments):
        return None


@pytest.fixture
def jit(monkeypatch):
    """Every JIT launch records its arguments and returns one recording compiled kernel; the bound
    launchers made here are dropped afterwards."""
    compiled = RecordingCompiledKernel()
    jit_launches = []

    def run(self, *arguments, grid, warmup, **kwargs):
        jit_launches.append((self, grid, arguments, kwargs))
        return compiled

    monkeypatch.setattr(KERNEL_CLASS, "run", run)
    monkeypatch.setattr(specs, "_current_stream", lambda: "stream")
    yield compiled, jit_launches
    for spec in specs.ALL:
        spec._bound.clear()


def _f1_values(x, M=None, R=16):
    K = x.shape[1]
    M = x.shape[0] if M is None else M
    a = torch.randn(R, K)
    u = torch.empty(1, M, R)
    return dict(x=x, a=a, u=u, seg=None, seg_rank_start=None, M=M, K=K, R=R, num_splits=1, seed=1234, p=0.1,
                HAS_DROPOUT=True, SEGMENTED=False, RANK_FP32=True, RANK_PRECISION="ieee", R_PAD=16)


def _grid(M):
    return lambda meta: (configs.cdiv(M, meta["BLOCK_M"]), 1)


def test_a_bound_launch_passes_what_the_jit_launch_passed_in_the_kernels_order(jit):
    compiled, jit_launches = jit
    x = torch.randn(48, 64)
    values = _f1_values(x)
    specs.F1.launch(_grid(48), **values)
    assert len(jit_launches) == 1 and not compiled.launches
    kernel, grid, arguments, kwargs = jit_launches[0]
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages")}
    bound_by_jit = inspect.signature(specs.F1.kernel.fn).bind(*arguments, **kwargs)
    expected = list(bound_by_jit.arguments.values())  # what JITFunction.run hands the compiled launcher

    specs.F1.launch(_grid(48), **values)
    assert len(jit_launches) == 1, "the second launch of the variant went through the JIT again"
    (launch,) = compiled.launches
    gx, gy, gz, stream, function, packed, metadata, enter_hook, exit_hook, *passed = launch
    assert (gx, gy, gz) == (grid[0], grid[1], 1) and stream == "stream"
    assert (function, packed, metadata) == ("cu-function", "packed-metadata", None)
    assert len(passed) == len(specs.F1.kernel.arg_names) == len(expected)
    for name, got, want in zip(specs.F1.kernel.arg_names, passed, expected):
        if isinstance(want, torch.Tensor):
            assert got.data_ptr() == want.data_ptr() and got.dtype == want.dtype, name
        else:
            assert got == want and type(got) is type(want), name
    assert options == {k: specs.F1.pick_config(arguments, 4, 16)[k] for k in options}


@pytest.mark.parametrize("change", ["misaligned x", "one row", "fp16 adapter", "dropout off"])
def test_another_variant_goes_through_the_jit(jit, change):
    """Whatever Triton specializes on (alignment, divisibility by 16, a size of 1, dtypes) or the
    constexprs: a launch that differs there compiles its own variant."""
    compiled, jit_launches = jit
    x = torch.randn(48, 64)
    specs.F1.launch(_grid(48), **_f1_values(x))
    specs.F1.launch(_grid(48), **_f1_values(x))
    assert (len(jit_launches), len(compiled.launches)) == (1, 1)
    if change == "misaligned x":
        values = _f1_values(torch.randn(48 * 64 + 1)[1:].view(48, 64))
    elif change == "one row":
        values = _f1_values(torch.randn(1, 64))
    elif change == "fp16 adapter":
        values = dict(_f1_values(x), a=torch.randn(16, 64, dtype=torch.float16))
    else:
        values = dict(_f1_values(x), HAS_DROPOUT=False)
    specs.F1.launch(_grid(48), **values)
    assert (len(jit_launches), len(compiled.launches)) == (2, 1)


def test_autotuned_kernels_bind_per_token_bucket_and_tuning_key(jit):
    """F2's config is tuned per (token bucket, N, K): a launch in another bucket, or of another
    layer shape, must not reuse a variant bound with another tuned config."""
    def key(M, N, K):
        x, w, y = torch.randn(M, K), torch.randn(N, K), torch.empty(M, N)
        u, b = torch.empty(M, 16), torch.randn(N, 16)
        return specs.F2._bind_arguments(
            x=x, w=w, bias=None, u=u, b=b, seg=None, seg_rank_start=None, seg_scale=None, y=y, M=M, N=N, K=K, R=16,
            scaling=1.0, HAS_BIAS=False, SEGMENTED=False, BASE_GEMM=True, INPUT_PRECISION="ieee",
            SPLIT_RANK=False)[1]

    assert key(3008, 64, 64) == key(4096, 64, 64)
    assert len({key(4096, 64, 64), key(8192, 64, 64), key(4096, 128, 64), key(4096, 64, 128)}) == 4


def test_a_bound_launch_still_refuses_missing_names_and_required_tensors(jit):
    x = torch.randn(48, 64)
    specs.F1.launch(_grid(48), **_f1_values(x))
    with pytest.raises(TypeError, match=r"missing \['R_PAD'\]"):
        specs.F1.launch(_grid(48), **{k: v for k, v in _f1_values(x).items() if k != "R_PAD"})
    with pytest.raises(ValueError, match="tensor 'a' is required"):
        specs.F1.launch(_grid(48), **dict(_f1_values(x), a=None))


def test_a_seed_read_from_memory_is_another_variant(jit):
    """An int seed and a seed tensor (a device seed: CUDA graphs) compile to different kernels."""
    compiled, jit_launches = jit
    x = torch.randn(48, 64)
    specs.F1.launch(_grid(48), **_f1_values(x))
    specs.F1.launch(_grid(48), **dict(_f1_values(x), seed=torch.tensor([1234])))
    assert len(jit_launches) == 2
    specs.F1.launch(_grid(48), **dict(_f1_values(x), seed=torch.tensor([99])))  # another value: the same variant
    assert (len(jit_launches), len(compiled.launches)) == (2, 1)
