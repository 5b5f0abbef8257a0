"""Host functions (layer 2) of the fused LoRA linear on the Triton backend: allocate, launch.

Inputs arrive validated and flattened to 2-D with a unit last-dim stride (the autograd layer
does that), as the operand descriptions of `lorakernels.operands` and a `LaunchPlan`. Each
kernel is launched through its spec (`ops.specs`), which builds the argument list and picks
the config. Math, shapes and dtypes: see the kernel modules.

Forward: F1 (dropout + down-projection: U; split over K for small batches), then F2 (the GEMM
core: Y). Backward, as named passes chosen by `plan_backward`: the pass over dY (B1: V, and at
small ranks dB; split over N for small batches), the dX GEMM (B2), the adapter gradients (B3: dA,
and dB at large ranks; split over rows).

Limitations:
- x, weight and bias share one dtype (fp32, fp16 or bf16); lora_A/lora_B are that dtype
  or fp32. The rank-R products run in the adapters' precision with fp32 accumulation: fp32
  adapters under 16-bit x take fp32 operands and full fp32 (FMA) dots, as PEFT computes them in
  fp32 outside autocast; 16-bit adapters x's dtype (`plan.low_rank_math`); U and V are kept in fp32.
- fp32 inputs use TF32 dots only when the plan says so (`torch.backends.cuda.matmul.allow_tf32`,
  as torch.matmul); otherwise full-precision fp32 dots.
- Ranks 1..256 (padded to a power of two >= 16 inside the kernels).
- Deterministic: the reductions over tokens (dA, dB), and over K in F1 and N in B1 where one
  program per row block would leave the GPU idle (`_split_count`), are two-stage: fp32 partials
  summed in a fixed order, no atomics. The split count depends on the shape and the config only
  (configs.RANK_PASS_TARGET_PROGRAMS, not the device's SM count), so the same inputs give the same
  bits; another split count sums U and V in another order (fp32 rounding), dB's partials never change.
- The dropout stream is Triton's Philox; it differs from torch's RNG (the CPU backend)
  and may differ between Triton versions. Same seed, same Triton: same mask.
"""

import functools
from typing import NamedTuple

import torch

from lorakernels.operands import Adapter, DenseWeight, GradsNeeded
from lorakernels.ops import configs, gemm_strategy, specs
from lorakernels.plan import Backend, BaseGemm, resolve_plan


def _gemm_grid(M, n_out):
    return lambda meta: (configs.cdiv(M, meta["BLOCK_M"]) * configs.cdiv(n_out, meta["BLOCK_N"]),)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _persistent_grid(M, n_out, device):
    """At most one program per SM (the interpreter: 3, so that each loops over several tiles)."""
    programs = _multiprocessors(device) if device.type == "cuda" else 3
    return lambda meta: (min(programs, configs.cdiv(M, meta["BLOCK_M"]) * configs.cdiv(n_out, meta["BLOCK_N"])),)


def tma_addressable(*tensors):
    """Whether TMA can address these 2-D tensors: 16-bit elements (the TMA kernels' dtypes), a
    16-byte aligned base, a unit column stride and a row stride that is a multiple of 16 bytes.
    Anything else (views at odd offsets, odd feature counts, fp32) takes the pointer kernels."""
    return all(t.element_size() == 2 and t.data_ptr() % 16 == 0 and t.stride(1) == 1
               and (t.stride(0) * 2) % 16 == 0 for t in tensors)


def _segment_args(segments):
    """The segment-table arguments of a kernel (`operands.Segments`; absent for one adapter)."""
    if segments is None:
        return dict(seg=None, seg_rank_start=None, SEGMENTED=False)
    return dict(seg=segments.row_segment, seg_rank_start=segments.rank_start, SEGMENTED=True)


def _segment_scale_args(segments):
    """`_segment_args` with each segment's scaling, for the kernels that apply it."""
    return dict(_segment_args(segments), seg_scale=None if segments is None else segments.scale)


def _segment_count(segments):
    """The size of the segment axis of the rank-R kernels' grids: 1 for one adapter."""
    return 1 if segments is None else segments.count


def _launch_gemm_core(kernels, base, strategy, operand, out, shared):
    """Launch the GEMM core on `operand` (its name, its [M, reduction] tensor) into `out` (name,
    [M, n_out] tensor): the TMA-persistent kernel where the strategy (a concrete `BaseGemm`) asks for
    it and TMA can address a dense W and the operands, else the kernel of the base weight's kind
    (`specs.GEMM_CORES`; under CUBLAS without the base GEMM, which cuBLAS then adds). kernels: F2's
    or B2's entry of `specs.GEMM_CORES`."""
    (a_name, a), (out_name, y) = operand, out
    M, n_out = y.shape
    tensors = {a_name: a, out_name: y}
    w = base.dense_weight
    if strategy is BaseGemm.TRITON_TMA and w is not None and tma_addressable(a, w, y):
        kernels["tma"].launch(_persistent_grid(M, n_out, a.device), **tensors, w=w, **shared)
    else:
        kernels[base.kind].launch(_gemm_grid(M, n_out), **tensors, **base.kernel_args(strategy is not BaseGemm.CUBLAS),
                                  **shared)


def _f2(x, base, u, lora_B, y, scaling, plan, strategy, segments=None):
    """F2 into y: b + s U B^T, plus X W^T unless the strategy is CUBLAS (then cuBLAS adds it)."""
    M, K = x.shape
    N, R = base.out_features, u.shape[1]
    shared = dict(bias=base.bias, u=u, b=lora_B, M=M, N=N, K=K, R=R, scaling=scaling, HAS_BIAS=base.bias is not None,
                  INPUT_PRECISION=plan.input_precision(x.dtype), **plan.split_rank(x.dtype, lora_B.dtype),
                  **_segment_scale_args(segments))
    _launch_gemm_core(specs.GEMM_CORES["F2"], base, strategy, ("x", x), ("y", y), shared)
    if strategy is BaseGemm.CUBLAS:
        y.addmm_(x, base.dense_weight.t())  # cuBLAS adds X W^T to b + s U B^T in its epilogue (beta = 1).


def _b2(dy, base, v, lora_A, dx, adapter, plan, strategy):
    """B2 into dx: (V A) * keep / (1 - p), plus dY W unless the strategy is CUBLAS (then cuBLAS adds it)."""
    M, N = dy.shape
    K, R = base.in_features, v.shape[1]
    shared = dict(v=v, a=lora_A, M=M, N=N, K=K, R=R, seed=adapter.seed, p=adapter.dropout_p,
                  HAS_DROPOUT=adapter.has_dropout, INPUT_PRECISION=plan.input_precision(dy.dtype),
                  **plan.split_rank(dy.dtype, lora_A.dtype), **_segment_scale_args(adapter.segments))
    _launch_gemm_core(specs.GEMM_CORES["B2"], base, strategy, ("dy", dy), ("dx", dx), shared)
    if strategy is BaseGemm.CUBLAS:
        dx.addmm_(dy, base.dense_weight)


def _reduce_partials(partials, out, scaling):
    """out [rows, cols] = scaling * the fixed-order sum of partials [S, rows, cols]; out is
    contiguous or the transposed view of a contiguous tensor (dB^T into dB)."""
    rows, cols = out.shape
    transposed = out.stride(1) != 1
    block = specs.REDUCE.fixed_config(4)["BLOCK"]
    specs.REDUCE.launch(lambda meta: (configs.cdiv(rows * cols, block),), part=partials, out=out,
                        num_parts=partials.shape[0], numel=rows * cols, cols=cols, scaling=scaling,
                        TRANSPOSED=transposed)
    return out


def _split_count(programs, steps):
    """Into how many ranges a rank-R pass cuts its reduction of `steps` tile steps (F1: K, B1: N,
    B3: rows) when its grid holds `programs` programs per range: enough for programs x splits to
    reach configs.RANK_PASS_TARGET_PROGRAMS where the steps allow (at most one range a step), 1
    where the grid alone reaches it."""
    return max(1, min(steps, configs.cdiv(configs.RANK_PASS_TARGET_PROGRAMS, programs)))


def _split_output(out, splits, zeroed):
    """What a pass split `splits` ways writes: `out` itself (as [1, rows, cols]) with one split,
    else fp32 partials [splits, rows, cols] for `_reduce_partials` to sum into `out`, zeroed where
    the kernel leaves entries unwritten (segments: the rows and columns no program of theirs owns)."""
    if splits == 1:
        return out.unsqueeze(0)
    return (torch.zeros if zeroed else torch.empty)((splits, *out.shape), device=out.device, dtype=torch.float32)


def lora_forward(x, base, adapter, plan):
    """Forward on 2-D inputs: (y [M, N] in x's dtype, u [M, R] fp32), u = Xd @ A^T saved for backward.

    x: [M, K], unit last-dim stride. base: a base-weight description (`operands`). adapter: Adapter (with
    segments, u is compact: [M, max_rank], each row its own adapter's columns). plan: LaunchPlan.
    """
    y = torch.empty((x.shape[0], base.out_features), device=x.device, dtype=x.dtype)
    u = down_projection_pass(x, adapter, plan)
    if x.shape[0]:
        forward_gemm_pass(x, base, u, adapter, plan, y)
    return y, u


def down_projection_pass(x, adapter, plan):
    """F1: U = dropout(X) A^T [M, rank width] fp32 (with segments each row its own adapter's columns,
    zeros past its rank and in the rows of no adapter).

    Where one program per BLOCK_M rows would leave the GPU idle, K is cut into ranges
    (`_split_count`): each writes an fp32 partial of U, summed in range order by the reduction."""
    M, K = x.shape
    R, width, segments = adapter.rank, adapter.rank_width, adapter.segments
    if not M:
        return torch.empty((0, width), device=x.device, dtype=torch.float32)
    r_pad = configs.padded_rank(width)
    rank_math = plan.low_rank(x.dtype, adapter.lora_A.dtype)
    cfg = specs.F1.fixed_config(specs.F1.config_bytes(x.element_size(), rank_math), r_pad)
    row_blocks = configs.cdiv(M, cfg["BLOCK_M"])
    splits = _split_count(row_blocks, configs.cdiv(K, cfg["BLOCK_K"]))
    u = (torch.zeros if segments is not None and splits == 1 else torch.empty)(
        (M, width), device=x.device, dtype=torch.float32)
    out = _split_output(u, splits, zeroed=segments is not None)
    specs.F1.launch(lambda meta: (row_blocks, splits, _segment_count(segments)), x=x, a=adapter.lora_A, u=out, M=M,
                    K=K, R=R, num_splits=splits, seed=adapter.seed, p=adapter.dropout_p,
                    HAS_DROPOUT=adapter.has_dropout, R_PAD=r_pad, **rank_math, **_segment_args(segments))
    if splits > 1:
        _reduce_partials(out, u, 1.0)
    return u


def forward_gemm_pass(x, base, u, adapter, plan, y):
    """F2 into y [M, N]: X W^T + b + s U B^T, by the plan's base-GEMM strategy (AUTO: the chosen one)."""
    _with_strategy("F2", x, base, y, adapter, plan, adapter.has_dropout,
                   lambda strategy: _f2(x, base, u, adapter.lora_B, y, adapter.scaling, plan, strategy,
                                        adapter.segments))


def _with_strategy(pass_name, a, base, out, adapter, plan, has_dropout, run):
    """run(strategy) with the plan's base-GEMM strategy; under AUTO the one `ops.gemm_strategy` chose for
    this kind of pass (timed on its first call). a: the GEMM's streamed operand, out: its output."""
    if base.dense_weight is None:  # a packed W: only its own fused kernels read it
        run(BaseGemm.TRITON)
        return
    if plan.base_gemm is not BaseGemm.AUTO:
        run(plan.base_gemm)
        return
    M, n_out = out.shape
    kind = (pass_name, specs.token_bucket(M), n_out, a.shape[1], a.dtype, adapter.lora_A.dtype, base.bias is not None,
            has_dropout, adapter.segments is not None, configs.padded_rank(adapter.rank_width), plan.tf32, base.kind,
            a.device)
    gemm_strategy.run_chosen(kind, a.device, lambda: gemm_strategy.candidates(
        a.device, tma_addressable(a, base.dense_weight, out)), run)


class BackwardPlan(NamedTuple):
    """Which passes a backward runs.

    v: V = s dY B is needed (for dX or dA). db_in_dy_pass: dB rides along B1's pass over dY.
    db_by_adapter_pass: dB^T = U^T dY by B3 (a second read of dY). dx, da: the B2 and B3 passes.
    """

    v: bool
    db_in_dy_pass: bool
    db_by_adapter_pass: bool
    dx: bool
    da: bool


@functools.lru_cache(maxsize=None)
def plan_backward(needs, rank, segment_count=1):
    """The passes for the gradients `needs` asks for at adapter rank `rank`.

    dB joins the pass over dY while its per-slab partials (M / BLOCK_M x N x R fp32) cost fewer
    bytes than a second read of dY (configs.FUSED_DB_MAX_RANK); at larger ranks B3 computes it.
    With several adapters in the batch, B3 too: in B1 each segment's program would read its
    slab of dY whether or not the slab has rows of that segment.
    """
    db_in_dy_pass = needs.db and segment_count == 1 and configs.padded_rank(rank) <= configs.FUSED_DB_MAX_RANK
    return BackwardPlan(v=needs.dx or needs.da, db_in_dy_pass=db_in_dy_pass,
                        db_by_adapter_pass=needs.db and not db_in_dy_pass, dx=needs.dx, da=needs.da)


def pass_over_dy(dy, u, adapter, db, passes, rank_math):
    """B1: V = s dY B [M, R] fp32 (None unless passes.v) and, with passes.db_in_dy_pass, dB into db.
    With segments V is compact and unscaled ([M, max_rank]; s is 1), zero where a row has no column.

    Where one program per row slab would leave the GPU idle, N is cut into ranges (`_split_count`):
    each writes an fp32 partial of V, summed in range order by the reduction; the dB partials stay
    one per slab (each range writes its own rows of them), so dB does not depend on the split."""
    M, N = dy.shape
    R, width, segments = adapter.rank, adapter.rank_width, adapter.segments
    r_pad = configs.padded_rank(width)
    cfg = specs.B1.fixed_config(specs.B1.config_bytes(dy.element_size(), rank_math), r_pad)
    num_slabs = configs.cdiv(M, cfg["BLOCK_M"])
    splits = _split_count(num_slabs, configs.cdiv(N, cfg["BLOCK_N"]))
    v = v_out = None
    if passes.v:
        v = (torch.zeros if segments is not None and splits == 1 else torch.empty)(
            (M, width), device=dy.device, dtype=torch.float32)
        v_out = _split_output(v, splits, zeroed=segments is not None)
    db_part = (torch.empty((num_slabs, N, R), device=dy.device, dtype=torch.float32) if passes.db_in_dy_pass
               else None)
    specs.B1.launch(lambda meta: (num_slabs, splits, _segment_count(segments)), dy=dy, b=adapter.lora_B,
                    u=u if passes.db_in_dy_pass else None, v=v_out, db_part=db_part, M=M, N=N, R=R,
                    num_splits=splits, scaling=adapter.scaling if splits == 1 else 1.0, COMPUTE_V=passes.v,
                    COMPUTE_DB=passes.db_in_dy_pass, R_PAD=r_pad, **rank_math, **_segment_scale_args(segments))
    if passes.v and splits > 1:
        _reduce_partials(v_out, v, adapter.scaling)
    if passes.db_in_dy_pass:
        _reduce_partials(db_part, db, adapter.scaling)
    return v


def adapter_grad_pass(v, x, out, scaling, seed, dropout_p, rank_math, segments=None):
    """B3: out [R, K] (any strides) = scaling * V^T @ (X * keep / (1 - p)).

    dA: V = s dY B, X = x (mask regenerated). dB^T: V = U, X = dY, no dropout, out = dB^T.
    Rows are cut into slices (enough programs to fill the GPU); each slice's fp32 partial is
    summed in slice order by the reduction. With segments V is compact ([M, max_rank]), out is
    the concatenated adapters' [R, K] and each segment's rows are scaled by its scaling.
    """
    M, K = x.shape
    R = out.shape[0]
    r_pad = configs.padded_rank(v.shape[1])
    cfg = specs.B3.fixed_config(specs.B3.config_bytes(x.element_size(), rank_math), r_pad)
    col_tiles = configs.cdiv(K, cfg["BLOCK_K"])
    row_blocks = configs.cdiv(M, cfg["BLOCK_M"])
    splits = _split_count(col_tiles, row_blocks)
    rows_per_split = configs.cdiv(row_blocks, splits) * cfg["BLOCK_M"]
    splits = configs.cdiv(M, rows_per_split)
    partials = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    specs.B3.launch(lambda meta: (col_tiles, splits, _segment_count(segments)), x=x, v=v, part=partials,
                    M=M, K=K, R=R, rows_per_split=rows_per_split, seed=seed, p=dropout_p, HAS_DROPOUT=dropout_p > 0,
                    R_PAD=r_pad, **rank_math, **_segment_scale_args(segments))
    return _reduce_partials(partials, out, scaling)


def dx_gemm_pass(dy, base, v, adapter, plan):
    """B2: dX = dY W + (V A) * keep / (1 - p) [M, K], written once (cuBLAS adds dY W if so planned)."""
    dx = torch.empty((dy.shape[0], base.in_features), device=dy.device, dtype=dy.dtype)
    _with_strategy("B2", dy, base, dx, adapter, plan, adapter.has_dropout,
                   lambda strategy: _b2(dy, base, v, adapter.lora_A, dx, adapter, plan, strategy))
    return dx


def lora_backward(dy, x, u, base, adapter, plan, needs=GradsNeeded()):
    """Backward on 2-D inputs: (dx [M, K], dA [R, K], dB [N, R]), None for what `needs` does not ask.

    dy: [M, N] in x's dtype, unit last-dim stride. x, u: as saved from `lora_forward` (x may be
    None unless needs.da, u unless needs.db). Gradients in x's / the adapters' dtype.
    """
    passes = plan_backward(needs, adapter.rank_width, _segment_count(adapter.segments))
    rank_math = plan.low_rank(dy.dtype, adapter.lora_A.dtype)
    db = torch.empty_like(adapter.lora_B) if needs.db else None
    da = torch.empty_like(adapter.lora_A) if needs.da else None
    if dy.shape[0] == 0:
        dx = dy.new_zeros((0, base.in_features)) if needs.dx else None
        return dx, da.zero_() if needs.da else None, db.zero_() if needs.db else None
    v = pass_over_dy(dy, u, adapter, db, passes, rank_math) if passes.v or passes.db_in_dy_pass else None
    if passes.db_by_adapter_pass:
        adapter_grad_pass(u, dy, db.t(), adapter.scaling, 0, 0.0, rank_math, adapter.segments)
    dx = dx_gemm_pass(dy, base, v, adapter, plan) if passes.dx else None
    if passes.da:
        adapter_grad_pass(v, x, da, 1.0, adapter.seed, adapter.dropout_p, rank_math, adapter.segments)
    return dx, da, db


def _unread_operand(row_stride, device):
    """A stand-in for the rank-R operands that R = 0 never reads: fp32 with the row stride of
    fp32 adapters at rank 16, so that the launch compiles and tunes as that fused call does."""
    return torch.empty((1, row_stride), device=device, dtype=torch.float32)


def _gemm_alone_plan(device, plan):
    return plan or resolve_plan(device, backend=Backend.TRITON, base_gemm=BaseGemm.TRITON)


def base_gemm_forward(x, weight, bias=None, plan=None):
    """Y = X W^T + b by F2 with the rank-R term switched off (R = 0): the fused forward's main
    loop alone, on the launch path the fused call takes, so that benchmarks can set it
    against cuBLAS (`torch.addmm`) on the same shapes. x: [M, K], weight: [N, K], one dtype.
    plan: default, the Triton backend with TF32 as torch.matmul would use it."""
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    if x.shape[0]:
        unread = _unread_operand(16, x.device)
        plan = _gemm_alone_plan(x.device, plan)
        _f2(x, DenseWeight(weight, bias), unread[:, :0], unread, y, 1.0, plan, plan.base_gemm)
    return y


def base_gemm_grad_x(dy, weight, plan=None):
    """dX = dY W by B2 with the rank-R term switched off (R = 0): see `base_gemm_forward`."""
    if dy.shape[0] == 0:
        return dy.new_empty((0, weight.shape[1]))
    unread = Adapter(_unread_operand(weight.shape[1], dy.device), None, 1.0)
    return dx_gemm_pass(dy, DenseWeight(weight), _unread_operand(16, dy.device)[:, :0], unread,
                        _gemm_alone_plan(dy.device, plan))


def dropout_keep_mask(seed, M, K, dropout_p, device):
    """The (M, K) boolean keep-mask the kernels regenerate for `seed` (tests and debugging only)."""
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    if M and K:
        cfg = specs.DROPOUT_MASK.fixed_config(1)
        grid = (configs.cdiv(M, cfg["BLOCK_M"]), configs.cdiv(K, cfg["BLOCK_K"]))
        specs.DROPOUT_MASK.launch(lambda meta: grid, config=cfg, out=out, M=M, K=K, seed=seed, p=dropout_p)
    return out.bool()
