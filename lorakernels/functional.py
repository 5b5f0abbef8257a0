"""`lora_linear` (layer 4): the functional form of the fused LoRA linear.

It settles the operands (autocast, validation), resolves the `LaunchPlan` once, flattens x to
rows and hands them to the autograd layer (`lorakernels.autograd`): the custom ops under
torch.compile, the eager autograd.Function otherwise.
"""

import collections
import itertools

import torch

from lorakernels._validation import MAX_RANK, check_lora_linear_inputs
from lorakernels.autograd import (
    BaseOpArgs,
    EagerCall,
    EagerLoRALinear,
    device_seed,
    draw_seed,
    lora_linear_forward_op,
    pack_scalars,
    segment_args,
)
from lorakernels.four_bit import four_bit_weight, is_params4bit
from lorakernels.operands import Segments
from lorakernels.plan import resolve_plan
from lorakernels.reference import lora_linear_ref, lora_linear_segmented_ref


def _as_rows(t):
    """2-D [M, features] view (a copy only if no view exists) with a unit last-dim stride."""
    if t.dim() == 2 and t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return t
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


def _autocast_operands(x, weight, bias, lora_A, lora_B):
    """Under torch.autocast, compute as nn.Linear would: x, weight and bias in the autocast dtype.

    fp32 adapters stay fp32 (the kernels cast their tiles); adapters in another dtype follow
    the autocast dtype. The output then has the autocast dtype. A 4-bit weight stays as it is:
    the autocast dtype becomes its compute dtype.
    """
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return x, weight, bias, lora_A, lora_B  # not a float input: left for validation to reject
    x, bias = (t.to(dtype) if t is not None else None for t in (x, bias))
    if isinstance(weight, torch.Tensor):
        weight = weight.to(dtype)
    adapters = [a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype != torch.float32 else a
                for a in (lora_A, lora_B)]
    return (x, weight, bias, *adapters)


def _base_description(weight):
    """A dense weight as it is; a bitsandbytes Params4bit as its `FourBitWeight` (codes shared)."""
    return four_bit_weight(weight) if is_params4bit(weight) else weight


def _check_frozen(weight):
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("lora_linear keeps the base weight frozen; got weight.requires_grad=True "
                         f"(weight {tuple(weight.shape)}). Call weight.requires_grad_(False).")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None, base_gemm=None):
    """Fused LoRA linear: y = x W^T + b + scaling * dropout(x) A^T B^T.

    Args:
        x: [*, in_features], in_features >= 1, fp32/fp16/bf16, any strides. On the meta device
            (all operands) only shapes and dtypes are computed, with autograd, as by nn.Linear.
        weight: [out_features, in_features], frozen, x's dtype. Or a 4-bit base (QLoRA): an
            `operands.FourBitWeight` (its own bias None), or a quantized bitsandbytes `Params4bit`
            (read into one at each call, double-quantized scales expanded then); x's dtype is
            then the compute dtype, fp32/fp16/bf16, and the kernels dequantize W's tiles in
            registers (the torch backend dequantizes W for the call).
        bias: [out_features] or None, x's dtype.
        lora_A: [r, in_features]; lora_B: [out_features, r]; x's dtype or fp32.
        scaling: lora_alpha / r (or lora_alpha / sqrt(r) for rsLoRA), finite in the adapters' dtype.
        dropout_p: dropout on the input of A, in [0, 1). training: False disables dropout.
        backend: 'auto' | 'triton' | 'torch' or a `plan.Backend` (default: env LORAKERNELS_BACKEND, else 'auto').
        base_gemm: 'auto' | 'triton' | 'triton-tma' | 'cublas' or a `plan.BaseGemm` (default: env
            LORAKERNELS_BASE_GEMM, else 'auto': the measured-fastest per kind of call; see `plan.BaseGemm`).
    Returns:
        y: [*, out_features] in x's dtype.
    """
    weight = _base_description(weight)
    if isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, lora_A, lora_B = _autocast_operands(x, weight, bias, lora_A, lora_B)
    check_lora_linear_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    _check_frozen(weight)
    if x.is_meta:
        # Meta tensors (models built under `torch.device("meta")` before their weights are
        # loaded) carry shapes and dtypes only: the plain composition propagates them, and
        # autograd's, as nn.Linear's does. Backend choices are checked as for a CUDA model.
        resolve_plan(torch.device("cuda"), backend, base_gemm)
        dense = weight if isinstance(weight, torch.Tensor) else x.new_empty(weight.shape)
        return lora_linear_ref(x, dense, bias, lora_A, lora_B, scaling)
    return _fused(x, weight, bias, lora_A, lora_B, scaling, dropout_p if training else 0.0, backend, base_gemm)


def _fused(x, weight, bias, lora_A, lora_B, scaling, p, backend, base_gemm, segments=None, parts=None):
    """The fused call on validated operands: plan, scalars, rows, then the autograd layer.
    parts: the (adapter index, lora_A, lora_B) whose factors lora_A and lora_B concatenate, if they
    do (eager autograd then keeps those instead of the concatenation)."""
    plan = resolve_plan(x.device, backend, base_gemm)
    rows = _as_rows(x)
    base = BaseOpArgs.of(weight)
    if torch.compiler.is_compiling():
        scalars = pack_scalars(draw_seed() if p > 0 else 0, scaling, p)
        y, _ = lora_linear_forward_op(rows, base.weight, bias, lora_A, lora_B, scalars, *plan.to_op_args(),
                                      *base[1:], *segment_args(segments))
    else:
        seed = _device_seed(x, segments) if p > 0 else None  # drawn on the device (graph capture), else the host's
        scalars = (int(draw_seed()) if p > 0 and seed is None else 0, float(scaling), float(p))
        y = EagerLoRALinear.apply(rows, base.weight, bias, lora_A, lora_B,
                                  EagerCall(plan, base, scalars, segments, parts, seed))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], base.shape[0])


def _device_seed(x, segments):
    """`autograd.device_seed` for one adapter. Several adapters in one batch keep host seeds (their
    kernels with a seed read from memory spilled registers on sm_90, build gate), so capturing them
    in a CUDA graph with dropout, which would replay one mask forever, is refused."""
    if segments is None:
        return device_seed(x)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lora_linear_segmented with dropout cannot be captured in a CUDA graph (its dropout "
                           "seed is drawn on the host, so every replay would reuse one mask): capture it in eval "
                           "mode or with dropout 0, or run it eagerly")
    return None


def lora_linear_segmented(x, weight, bias, adapters, row_adapter, dropout_p=0.0, training=True, backend=None,
                          base_gemm=None):
    """Several LoRA adapters in one batch, each row through its own:
    y[m] = x[m] W^T + b + s_a dropout(x[m]) A_a^T B_a^T, a = row_adapter[m] (-1: the base alone).

    The base GEMM runs once for the batch. The adapters with rows are concatenated along the rank
    and the kernels read a row-to-adapter table (`operands.Segments`): each row's rank-R products
    run with its own adapter's factors only (a tile of rows loops over the adapters its rows use),
    U = dropout(X) A^T and V = dY B are kept at the largest adapter's rank, each row's LoRA term
    joins the base GEMM's accumulator and each adapter's gradients gather its own rows only. Rows
    of one adapter cost least when they are contiguous (PEFT's per-sequence `adapter_names`): a
    tile whose rows use k adapters computes k rank-r products. Adapters without rows take no part
    in the call: they get no gradient at all (not a zero gradient).

    Args:
        x, weight, bias: as `lora_linear` (a dense or 4-bit base).
        adapters: a sequence of (lora_A [r_a, in_features], lora_B [out_features, r_a], scaling_a),
            the factors all of one dtype (x's or fp32); ranks may differ. The ranks of the adapters
            that have rows in the batch may sum to at most 256.
        row_adapter: which adapter each row uses, -1 for none: an integer tensor of x.shape[:-1]
            (one entry per token) or of x.shape[:1] (one per sequence), or a list or tuple of ints
            with one per sequence (x.shape[0]), as PEFT's `adapter_names`. A tensor is read once on
            the host to find the adapters with rows (a device synchronization on a GPU; a list
            costs none).
        dropout_p: dropout on the input of A, in [0, 1): one p for every adapter, or a sequence with
            one p per adapter. Every row's mask is regenerated from one seed per call; rows are
            disjoint between adapters, so their masks are independent draws. Where the adapters with
            rows have different p, the rows are grouped by p and each group is one fused call (each
            row still goes through the base GEMM once; the groups cost a gather of their rows of x
            and a scatter of their outputs). training: False disables dropout.
        backend, base_gemm: as `lora_linear`.
    Returns:
        y: [*, out_features] in x's dtype.
    """
    weight = _base_description(weight)
    adapters = _check_adapter_list(adapters)
    if isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, *_ = _autocast_operands(x, weight, bias, *adapters[0][:2])
        adapters = [(*_autocast_operands(x, weight, bias, A, B)[3:], s) for A, B, s in adapters]  # x is cast once
    rates = _dropout_per_adapter(dropout_p, len(adapters))
    for (lora_A, lora_B, scaling), p in zip(adapters, rates):
        check_lora_linear_inputs(x, weight, bias, lora_A, lora_B, scaling, p)
    _check_frozen(weight)
    if len({A.dtype for A, B, _ in adapters} | {B.dtype for A, B, _ in adapters}) > 1:
        raise TypeError("lora_linear_segmented: every adapter's lora_A and lora_B must share one dtype; got "
                        + ", ".join(f"adapter {a}: {A.dtype}/{B.dtype}" for a, (A, B, _) in enumerate(adapters)))
    index, present, index_key = _row_adapter_index(row_adapter, x, len(adapters))
    if x.is_meta:
        resolve_plan(torch.device("cuda"), backend, base_gemm)
        dense = weight if isinstance(weight, torch.Tensor) else x.new_empty(weight.shape)
        return lora_linear_segmented_ref(x, dense, bias, adapters, index)
    group_rates = sorted({rates[a] for a in present}) if training else [0.0]
    if len(group_rates) > 1:
        return _by_dropout_rate(x, weight, bias, adapters, index, rates, group_rates, backend, base_gemm)
    lora_A, lora_B, segments, parts = _concatenated(adapters, index, present, index_key)
    p = group_rates[0] if group_rates else 0.0
    return _fused(x, weight, bias, lora_A, lora_B, 1.0, p, backend, base_gemm, segments, parts)


def _dropout_per_adapter(dropout_p, num_adapters):
    """One dropout rate per adapter from a number or a sequence of them (validated later)."""
    if isinstance(dropout_p, (list, tuple)):
        if len(dropout_p) != num_adapters:
            raise ValueError(f"dropout_p as a sequence has one p per adapter ({num_adapters}); got {len(dropout_p)}")
        return list(dropout_p)
    return [dropout_p] * num_adapters


def _by_dropout_rate(x, weight, bias, adapters, index, rates, group_rates, backend, base_gemm):
    """Rows grouped by their adapter's dropout rate, one fused call per group (rows on the base alone
    join the first); outputs scattered back into row order. Differentiable through the gather and
    the scatter."""
    rows = _as_rows(x)
    group_of = {p: g for g, p in enumerate(group_rates)}  # rates of adapters without rows: never selected
    group_of_row = torch.tensor([0] + [group_of.get(p, -1) for p in rates], device=index.device)[index + 1]
    y = None
    for group, p in enumerate(group_rates):
        selected = (group_of_row == group).nonzero().squeeze(1)
        part = lora_linear_segmented(rows.index_select(0, selected), weight, bias, adapters, index[selected], p,
                                     True, backend, base_gemm)
        y = part.new_zeros((rows.shape[0], part.shape[1])) if y is None else y
        y = y.index_copy(0, selected, part)
    return y.view(*x.shape[:-1], y.shape[-1])


def _check_adapter_list(adapters):
    """The adapters as a list of (lora_A, lora_B, scaling) triples; TypeError / ValueError otherwise."""
    if isinstance(adapters, torch.Tensor) or not isinstance(adapters, (list, tuple)):
        raise TypeError(f"adapters must be a list or tuple of (lora_A, lora_B, scaling); got {type(adapters).__name__}")
    if not adapters:
        raise ValueError("adapters is empty: lora_linear_segmented needs at least one adapter")
    for a, entry in enumerate(adapters):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise TypeError(f"adapters[{a}] must be a (lora_A, lora_B, scaling) triple; got {type(entry).__name__}"
                            + (f" of length {len(entry)}" if isinstance(entry, (list, tuple)) else ""))
    return [tuple(entry) for entry in adapters]


# Several-adapter tables built from per-sequence lists, kept on the device (most recent last): every
# layer of a model call, and every call with the same batch layout, reuses them instead of building
# and copying them to the device again (four host-to-device copies per layer otherwise).
_TABLES = collections.OrderedDict()
TABLES_KEPT = 64


def _table(key, build):
    """The tables cached under `key`, built by `build()` the first time."""
    tables = _TABLES.get(key)
    if tables is None:
        tables = _TABLES[key] = build()
        if len(_TABLES) > TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


def _row_adapter_index(row_adapter, x, num_adapters):
    """(int64 [M] adapter index per row of x, sorted ids of the adapters with rows, the index's
    cache key: None unless built from a per-sequence list)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    leading = x.shape[:-1]
    if isinstance(row_adapter, (list, tuple)):
        if x.dim() < 2 or len(row_adapter) != x.shape[0]:
            raise ValueError(f"row_adapter as a list names one adapter per sequence (x.shape[0] = "
                             f"{x.shape[0] if x.dim() else None} for x of shape {tuple(x.shape)}); got "
                             f"{len(row_adapter)} entries")
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in row_adapter):
            raise TypeError(f"row_adapter entries must be ints (-1: no adapter); got {list(row_adapter)[:8]}")
        present = sorted(set(row_adapter))
        per_row = rows // max(x.shape[0], 1)
        key = ("rows", tuple(row_adapter), per_row, x.device)
        index = _table(key, lambda: torch.tensor(row_adapter, dtype=torch.int64).repeat_interleave(per_row).to(x.device))
    elif isinstance(row_adapter, torch.Tensor):
        key = None
        if row_adapter.dtype.is_floating_point or row_adapter.dtype == torch.bool or row_adapter.is_complex():
            raise TypeError(f"row_adapter must be an integer tensor; got {row_adapter.dtype}")
        if row_adapter.device != x.device:
            raise TypeError(f"row_adapter is on {row_adapter.device}, x on {x.device}: put them on one device")
        shape = tuple(row_adapter.shape)
        if shape == tuple(leading):
            index = row_adapter.reshape(-1).long()
        elif x.dim() >= 2 and shape == tuple(leading[:1]):
            index = row_adapter.long().repeat_interleave(rows // max(x.shape[0], 1))
        else:
            raise ValueError(f"row_adapter must have x's leading shape {tuple(leading)} (one adapter per row) or "
                             f"{tuple(leading[:1])} (one per sequence); got {shape}")
        present = [] if x.is_meta or index.numel() == 0 else torch.unique(index).tolist()
    else:
        raise TypeError(f"row_adapter must be an integer tensor or a list of ints; got {type(row_adapter).__name__}")
    bad = [a for a in present if not -1 <= a < num_adapters]
    if bad:
        raise ValueError(f"row_adapter names adapters {bad}, outside -1..{num_adapters - 1} ({num_adapters} adapters)")
    return index, [a for a in present if a >= 0], key


def _concatenated(adapters, index, present, index_key=None):
    """(lora_A, lora_B, `Segments`, parts) of the adapters with rows, concatenated along the rank
    (autograd flows back to each), with the rows renumbered to their positions; without any, the
    first adapter detached (no gradient) and every row on the base layer alone. parts: the
    (adapter index, lora_A, lora_B) triples concatenated, None for one adapter. index_key: the
    index's cache key (`_row_adapter_index`), under which the segment tables are cached too."""
    chosen = present or [0]
    ranks = [adapters[a][0].shape[0] for a in chosen]
    if sum(ranks) > MAX_RANK:
        raise ValueError(f"the adapters with rows in this batch have ranks {dict(zip(chosen, ranks))}, summing to "
                         f"{sum(ranks)} > {MAX_RANK}: split the batch")
    scales = tuple(float(adapters[a][2]) for a in chosen)

    def segment_tables():
        device = index.device
        position = torch.full((len(adapters) + 1,), -1, dtype=torch.int32)
        for i, a in enumerate(present):
            position[a + 1] = i
        rank_start = torch.tensor([0] + list(itertools.accumulate(ranks)), dtype=torch.int32)
        return (position.to(device)[index + 1], rank_start.to(device),
                torch.tensor(scales, dtype=torch.float32).to(device))

    if index_key is None:
        row_segment, rank_start, scale = segment_tables()
    else:
        key = ("segments", index_key, tuple(present), len(adapters), tuple(ranks), scales)
        row_segment, rank_start, scale = _table(key, segment_tables)
    factors = [adapters[a][:2] for a in chosen]
    if not present:
        factors = [(A.detach(), B.detach()) for A, B in factors]
    lora_A = factors[0][0] if len(factors) == 1 else torch.cat([A for A, _ in factors])
    lora_B = factors[0][1] if len(factors) == 1 else torch.cat([B for _, B in factors], dim=1)
    segments = Segments(row_segment, rank_start, scale, max(ranks))
    parts = tuple((a, A, B) for a, (A, B) in zip(chosen, factors)) if len(factors) > 1 else None
    return lora_A, lora_B, segments, parts
