"""The rank-R passes F1 (U = dropout(X) A^T) and B1 (V = s dY B, dB partials) cut their reduction
(F1: K, B1: N) into ranges where one program per row block would leave the GPU idle: each range
writes an fp32 partial, summed in range order by the reduction kernel, or with one range writes
U / V directly.

These would catch: a range that is skipped or summed twice, partials written at the wrong split
offset, unwritten partial entries (segments) leaking garbage into U or V, a scaling applied twice
or never, dB partials that change with the split, a split where the grid is already large (an
extra pass for nothing), and a split count that does not grow as the batch shrinks.
"""

import pytest
import torch

from lorakernels.operands import Adapter, Segments
from lorakernels.ops import configs, lora_linear as passes, specs
from lorakernels.ops.lora_linear import BackwardPlan
from lorakernels.plan import Backend, BaseGemm, resolve_plan
from tests.utils import DEVICE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
M, K, N = 70, 200, 150  # ragged in every dimension: 3 row blocks, 7 K steps and 5 N steps of 32 (interpreter)
BOTH = BackwardPlan(v=True, db_in_dy_pass=True, db_by_adapter_pass=False, dx=True, da=True)
# (x dtype, adapter dtype, dropout p, adapter ranks: one adapter, or several in one batch)
CASES = {
    "fp32": ("fp32", "fp32", 0.5, [5]),
    "bf16": ("bf16", "bf16", 0.0, [16]),
    "bf16_fp32_adapters_segments": ("bf16", "fp32", 0.5, [3, 8]),
    "fp16_segments": ("fp16", "fp16", 0.5, [8, 2]),
}


def _inputs(case, exact):
    """x, dY and an Adapter for a case. exact: small integers and dyadic fractions, whose sums are
    exact in fp32 in any order (so that every split must give the same bits as the reference);
    else random normals."""
    x_dtype, a_dtype, p, ranks = CASES[case]
    x_dtype, a_dtype = DTYPES[x_dtype], DTYPES[a_dtype]
    gen = torch.Generator().manual_seed(3)

    def draw(shape, dtype, denominator):
        if exact:
            return (torch.randint(-3, 4, shape, generator=gen).float() / denominator).to(dtype).to(DEVICE)
        return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)

    R = sum(ranks)
    x, dy = draw((M, K), x_dtype, 1), draw((M, N), x_dtype, 1)
    lora_A, lora_B = draw((R, K), a_dtype, 4), draw((N, R), a_dtype, 8)
    if len(ranks) == 1:
        return x, dy, Adapter(lora_A, lora_B, 0.5, p, seed=1234)
    rows = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32).repeat_interleave(torch.tensor([20, 9, 11, 25, 5]))
    rank_start = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int32)
    segments = Segments(rows.to(DEVICE), rank_start.to(DEVICE), torch.tensor([0.5, 2.0], device=DEVICE), max(ranks))
    return x, dy, Adapter(lora_A, lora_B, 1.0, p, seed=1234, segments=segments)


def _run(x, dy, adapter, target, monkeypatch, u=None):
    """(U, V, dB) from F1 and B1 with RANK_PASS_TARGET_PROGRAMS = target; B1 reads `u` if given
    (so that dB can be compared bit for bit whatever U's split was)."""
    monkeypatch.setattr(configs, "RANK_PASS_TARGET_PROGRAMS", target)
    plan = resolve_plan(x.device, backend=Backend.TRITON, base_gemm=BaseGemm.TRITON)
    u_out = passes.down_projection_pass(x, adapter, plan)
    db = torch.empty_like(adapter.lora_B)
    v = passes.pass_over_dy(dy, u_out if u is None else u, adapter, db, BOTH,
                            plan.low_rank(dy.dtype, adapter.lora_A.dtype))
    return u_out, v, db


def _reference(x, dy, adapter):
    """(U, V) in fp64 on the CPU: compact per row with segments (each row its own adapter's
    columns, zeros elsewhere), from the keep-mask the kernels regenerate."""
    p = adapter.dropout_p
    keep = passes.dropout_keep_mask(adapter.seed, M, K, p, x.device).cpu() if p else torch.ones(M, K, dtype=torch.bool)
    xd, dy = x.double().cpu() * keep / (1 - p), dy.double().cpu()
    A, B = adapter.lora_A.double().cpu(), adapter.lora_B.double().cpu()
    if adapter.segments is None:
        return xd @ A.t(), adapter.scaling * (dy @ B)
    seg, starts = adapter.segments.row_segment.tolist(), adapter.segments.rank_start.tolist()
    u = torch.zeros(M, adapter.rank_width, dtype=torch.float64)
    v = torch.zeros(M, adapter.rank_width, dtype=torch.float64)
    for m, s in enumerate(seg):
        if s >= 0:
            r = starts[s + 1] - starts[s]
            u[m, :r] = xd[m] @ A[starts[s]:starts[s + 1]].t()
            v[m, :r] = dy[m] @ B[:, starts[s]:starts[s + 1]]  # unscaled with segments
    return u, v


# Targets: no split; 3 ranges of K and N (interpreter: 7 K steps as 2 + 2 + 3, 5 N steps as
# 1 + 2 + 2); one range a tile step.
TARGETS = {"unsplit": 1, "three": 9, "every_step": 10**6}


def _f1_splits(x, adapter, target, monkeypatch):
    """The number of K ranges F1 takes for this x and adapter under `target`."""
    monkeypatch.setattr(configs, "RANK_PASS_TARGET_PROGRAMS", target)
    rank_math = resolve_plan(x.device, backend=Backend.TRITON).low_rank(x.dtype, adapter.lora_A.dtype)
    cfg = specs.F1.fixed_config(specs.F1.config_bytes(x.element_size(), rank_math),
                                configs.padded_rank(adapter.rank_width))
    return passes._split_count(configs.cdiv(M, cfg["BLOCK_M"]), configs.cdiv(K, cfg["BLOCK_K"]))


@pytest.mark.parametrize("case", list(CASES))
def test_split_and_unsplit_launches_give_the_same_bits_on_exact_inputs(case, monkeypatch):
    """On inputs whose sums are exact in any order, every split gives U, V and dB bit-identical to
    the unsplit launch, and U, V equal to the fp64 reference: what differs between splits is only
    the order of fp32 additions, never which terms are summed, where they land, or their scaling."""
    x, dy, adapter = _inputs(case, exact=True)
    splits = [_f1_splits(x, adapter, target, monkeypatch) for target in TARGETS.values()]
    assert splits == [1, 3, 7] if DEVICE.type == "cpu" else splits[0] == 1 < splits[-1], splits
    results = {name: _run(x, dy, adapter, target, monkeypatch) for name, target in TARGETS.items()}
    u_ref, v_ref = _reference(x, dy, adapter)
    u1, v1, db1 = results["unsplit"]
    assert torch.equal(u1.double().cpu(), u_ref), "unsplit U differs from the exact reference"
    assert torch.equal(v1.double().cpu(), v_ref), "unsplit V differs from the exact reference"
    for name, (u, v, db) in results.items():
        for label, got, want in (("U", u, u1), ("V", v, v1), ("dB", db, db1)):
            assert torch.equal(got, want), f"{label} split {name}: {(got != want).sum()} elements differ"


@pytest.mark.parametrize("case", ["fp32", "bf16_fp32_adapters_segments"])
def test_split_launches_on_random_inputs(case, monkeypatch):
    """Random inputs: dB bit-identical whatever the split (its partials stay one per row slab);
    U and V differ from the unsplit launch only by fp32 rounding (another order of additions), and
    a split launch repeated gives the same bits (a fixed-order reduction, no atomics)."""
    x, dy, adapter = _inputs(case, exact=False)
    u1, v1, db1 = _run(x, dy, adapter, TARGETS["unsplit"], monkeypatch)
    for target in (TARGETS["three"], TARGETS["every_step"]):
        u, v, db = _run(x, dy, adapter, target, monkeypatch, u=u1)
        again = _run(x, dy, adapter, target, monkeypatch, u=u1)
        assert all(torch.equal(a, b) for a, b in zip((u, v, db), again)), "a repeated split launch changed bits"
        assert torch.equal(db, db1), f"dB changed with the split: {(db != db1).sum()} elements"
        for label, got, want in (("U", u, u1), ("V", v, v1)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=label)


def _launch_grids(monkeypatch, m, k, n, gpu_configs):
    """The grids F1 and B1 launch for an [m, k] x and [m, n] dY at rank 16 with bf16 x and bf16
    adapters, and the partials the reductions sum: launches recorded, not run. gpu_configs: the
    configs a GPU launch takes, rather than the interpreter's."""
    launched = []

    def record(spec, grid, config=None, **values):
        launched.append((spec.code, grid({}), values.get("part")))

    monkeypatch.setattr(specs.KernelSpec, "launch", record)
    if gpu_configs:
        monkeypatch.setattr(specs.KernelSpec, "fixed_config", lambda spec, eb, r_pad=None: spec.configs(eb, r_pad)[0])
    # Stand-ins with the shapes only (nothing runs): one row, broadcast.
    x, dy = torch.empty(1, k, dtype=torch.bfloat16).expand(m, k), torch.empty(1, n, dtype=torch.bfloat16).expand(m, n)
    adapter = Adapter(torch.empty(16, k, dtype=torch.bfloat16), torch.empty(n, 16, dtype=torch.bfloat16), 2.0)
    plan = resolve_plan(x.device, backend=Backend.TRITON, base_gemm=BaseGemm.TRITON)
    u = passes.down_projection_pass(x, adapter, plan)
    passes.pass_over_dy(dy, u, adapter, torch.empty_like(adapter.lora_B), BOTH, plan.low_rank(dy.dtype, dy.dtype))
    return launched


@pytest.mark.parametrize("gpu_configs", [False, True], ids=["interpreter_configs", "gpu_configs"])
def test_the_split_count_grows_as_the_batch_shrinks(gpu_configs, monkeypatch):
    """F1's K ranges and B1's N ranges: none once the grid alone reaches the target (and then no
    reduction pass for U or V), more as M shrinks, until programs reach the target or every range
    is one tile step."""
    target = configs.RANK_PASS_TARGET_PROGRAMS
    k = n = 4096
    seen = {"F1": [], "B1": []}
    for m in (1 << 16, 16384, 4096, 512, 256, 64, 1):
        launched = _launch_grids(monkeypatch, m, k, n, gpu_configs)
        codes = [code for code, _, _ in launched]
        for code, step_name, extent in (("F1", "BLOCK_K", k), ("B1", "BLOCK_N", n)):
            spec = getattr(specs, code)
            (grid,) = [g for c, g, _ in launched if c == code]
            row_blocks, splits, segments = grid
            steps = configs.cdiv(extent, spec.fixed_config(2, 16)[step_name])
            assert row_blocks == configs.cdiv(m, spec.fixed_config(2, 16)["BLOCK_M"]) and segments == 1
            assert 1 <= splits <= steps
            if row_blocks >= target:
                assert splits == 1, f"{code} split a grid of {row_blocks} programs at M={m}"
            else:
                assert row_blocks * splits >= target or splits == steps, (code, m, grid)
                assert row_blocks * (splits - 1) < target, f"{code} split more than needed at M={m}: {grid}"
            seen[code].append(splits)
        # One reduction for dB always; one for U and one for V exactly where they were split.
        expected_reduces = 1 + (seen["F1"][-1] > 1) + (seen["B1"][-1] > 1)
        assert codes.count("reduce") == expected_reduces, (m, codes)
        if seen["F1"][-1] > 1:
            partials = launched[codes.index("F1") + 1][2]
            assert partials.shape == (seen["F1"][-1], m, 16) and partials.dtype == torch.float32
    for code, counts in seen.items():
        assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > 1, (code, counts)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("parts", [1, 3, 4, 5, 9])
def test_the_reduction_adds_the_partials_one_by_one_in_order(parts, transposed):
    """reduce_partials_kernel: out = scaling * (((0 + p0) + p1) + ...), bit for bit whatever the
    number of partials (catches a partial dropped past a multiple of the kernel's unrolling, or
    partials added in another order: random magnitudes round differently in another order)."""
    gen = torch.Generator().manual_seed(parts)
    partials = (torch.randn(parts, 37, 23, generator=gen) * torch.logspace(-3, 3, parts)[:, None, None]).to(DEVICE)
    expected = torch.zeros(37, 23, device=DEVICE)
    for p in partials:
        expected = expected + p
    expected = expected * 0.75
    out = torch.empty(23, 37, device=DEVICE).t() if transposed else torch.empty(37, 23, device=DEVICE)
    assert torch.equal(passes._reduce_partials(partials, out, 0.75), expected)
