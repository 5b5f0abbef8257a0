"""The autograd layer (layer 3) of the fused LoRA linear.

Two autograd paths share one forward body, one backward body and one saved state
(`SavedState`):

- two torch.library custom ops with a registered autograd formula
  (`lorakernels::lora_linear_forward` / `lorakernels::lora_linear_backward`), which
  torch.compile(fullgraph=True) sees as one opaque node per direction (the fake
  implementations give it the output shapes);
- `EagerLoRALinear`, a plain autograd.Function for eager mode (why: see its docstring).

Both build the operand descriptions of `lorakernels.operands` and call `ops.lora_forward` /
`ops.lora_backward` with a `LaunchPlan`. The plan crosses the custom-op boundary as
`plan.to_op_args()` (the schema takes only plain values) and is rebuilt with
`LaunchPlan.from_op_args`; the base weight crosses it as `BaseOpArgs` (a dense W, or a 4-bit
W's codes with its absmax, code table and blocksize), rebuilt with `BaseOpArgs.description`.
Inputs arrive validated and flattened to 2-D (`lora_linear`).
"""

import contextlib
from typing import NamedTuple, Optional, Tuple

import torch

from lorakernels import ops
from lorakernels.operands import Adapter, DenseWeight, FourBitWeight, GradsNeeded, Segments
from lorakernels.plan import LaunchPlan


def draw_seed():
    """Dropout seed (an int64 CPU scalar tensor) from torch's default CPU generator.

    `torch.manual_seed` reproduces it and `torch.utils.checkpoint` (which restores the CPU
    RNG state) replays it on recompute. Drawing on the CPU never synchronizes a GPU. The
    device is explicit: under `torch.set_default_device("cuda")` the draw would otherwise
    come from the CUDA generator, which checkpoint recompute does not replay.
    """
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device="cpu")


# Dropout seeds drawn on the device, as one-element int64 tensors the kernels read: where a CUDA
# graph is being captured (always), and everywhere while `graph_safe_dropout` is on.
_DEVICE_SEEDS = False


def graph_safe_dropout(enabled=True):
    """Draw every dropout seed on the device of the call (a one-element int64 tensor that the kernels
    read from memory) instead of on the host, and return the previous setting.

    A seed drawn on the host is a kernel argument, so a captured CUDA graph would replay one mask
    forever. A seed drawn by the device's generator is what a graph captures instead: PyTorch's
    CUDA generator is graph-safe, so every replay of a captured training step draws fresh seeds,
    hence fresh masks (forward and backward agree: backward reads the seed forward drew). Under
    capture lorakernels does this on its own; turning it on for eager runs too gives eager steps
    the masks a replay would draw from the same generator state (`torch.manual_seed`,
    `torch.cuda.graphs`' generator handling), at the cost of one tiny kernel per layer call.
    Checkpoint recompute replays device seeds too (`torch.utils.checkpoint` restores the device's
    generator). Only the eager path reads device seeds; under torch.compile seeds stay on the host.
    """
    global _DEVICE_SEEDS
    previous, _DEVICE_SEEDS = _DEVICE_SEEDS, bool(enabled)
    return previous


def device_seed(x):
    """A one-element int64 seed tensor on x's device when seeds are drawn there (`graph_safe_dropout`,
    or a CUDA graph being captured on the current stream); None when the host draws them."""
    if _DEVICE_SEEDS or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    return None


# The scalar pack: the dropout seed, the scaling and dropout_p travel in one float64 CPU tensor
# [seed, scaling, p]. The seed is drawn outside the op (so the op is a pure function of its
# inputs), and a tensor, unlike a float argument of a custom op (compiled once per value), is
# data to torch.compile: a new seed never recompiles, a new scaling or p at most once (when
# automatic dynamic makes it symbolic). Reading it inside the op costs no GPU synchronization
# (it lives on the CPU). float64 holds every seed (< 2**31) exactly.
_ONE = torch.ones((), dtype=torch.float64, device="cpu")


def pack_scalars(seed, scaling, dropout_p):
    """[seed, scaling, dropout_p] as one float64 CPU tensor; seed: an int or `draw_seed()`'s tensor."""
    if torch.compiler.is_compiling():
        # Built by tensor arithmetic: torch.compile traces a float multiplied into a tensor
        # without specializing on its value (torch.tensor / as_tensor of a float would).
        return torch.stack([_ONE * seed, _ONE * scaling, _ONE * dropout_p])
    return torch.tensor([int(seed), scaling, dropout_p], dtype=torch.float64, device="cpu")


def unpack_scalars(scalars):
    """(seed: int, scaling: float, dropout_p: float) from `pack_scalars`'s tensor."""
    seed, scaling, dropout_p = scalars.tolist()
    return int(seed), scaling, dropout_p


class BaseOpArgs(NamedTuple):
    """The frozen base weight as custom-op arguments (the schema takes tensors and plain values only).

    weight: a dense W [N, K]; or, for a 4-bit W (`FourBitWeight`), its packed codes viewed as uint8
    [N, K / 2] (a view: the shape carries N and K). absmax, table, blocksize: the 4-bit scales, code
    table and block size; None, None, 0 for a dense W. nested, nested_blocksize: under double
    quantization, absmax is the scales' uint8 codes, `nested` the rest of their `NestedScales`
    (`pack()`) and `nested_blocksize` theirs: what crosses the ops and what backward keeps, the
    fp32 scales being expanded for each launch.
    """

    weight: torch.Tensor
    absmax: Optional[torch.Tensor] = None
    table: Optional[torch.Tensor] = None
    blocksize: int = 0
    nested: Optional[torch.Tensor] = None
    nested_blocksize: int = 0

    @classmethod
    def of(cls, base):
        """From a dense W (a tensor) or a base-weight description (its `op_fields`; its own bias is
        not carried: see `description`)."""
        return cls(base) if isinstance(base, torch.Tensor) else cls(*base.op_fields())

    @property
    def four_bit(self):
        return self.absmax is not None

    @property
    def shape(self):
        """W's (out_features, in_features)."""
        N, columns = self.weight.shape
        return (N, 2 * columns) if self.four_bit else (N, columns)

    def description(self, bias=None):
        """The base-weight description the launchers take (`DenseWeight`, `FourBitWeight`), with
        `bias`. The op schema's fields tell the kinds apart: a 4-bit W has block scales."""
        if self.four_bit:
            return FourBitWeight.from_op_fields(*self, bias=bias)
        return DenseWeight(self.weight, bias)


def segments_of(row_segment, segment_rank_start, segment_scale, segment_max_rank):
    """The `Segments` of several adapters in one batch from their op arguments, or None (one adapter)."""
    if row_segment is None:
        return None
    return Segments(row_segment, segment_rank_start, segment_scale, segment_max_rank)


def segment_args(segments):
    """A `Segments` (or None) as the custom ops' segment arguments: three optional tensors and an int."""
    return (None, None, None, 0) if segments is None else tuple(segments)


class SavedState(NamedTuple):
    """What backward needs, saved by both autograd paths. Never the dropout mask (backward
    regenerates it from the seed), never a dense copy of a 4-bit W.

    x: the input [M, K], only when lora_A needs a gradient (dA = s (dY B)^T dropout(X)).
    base: the `BaseOpArgs` of W, for dX. lora_A, lora_B: the adapter.
    u: U = dropout(X) A^T [M, R] fp32, only when lora_B needs a gradient (dB = s dY^T U).
    scalars: the scalar pack [seed, scaling, p] (the custom ops), or the tuple (seed, scaling, p)
    (eager autograd, which keeps Python numbers on ctx instead of a tensor).
    segments: several adapters in one batch (`Segments`), or None. U is then [M, max_rank].
    seed: the dropout seed as a one-element tensor on the device (`device_seed`), which then
    replaces the pack's; or None.
    """

    x: Optional[torch.Tensor]
    base: BaseOpArgs
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    u: Optional[torch.Tensor]
    scalars: object
    segments: Optional[Segments] = None
    seed: Optional[torch.Tensor] = None

    @classmethod
    def of_forward(cls, x, base, lora_A, lora_B, u, scalars, segments=None, seed=None):
        """The state one forward leaves: x and U only where a gradient will need them."""
        return cls(x if lora_A.requires_grad else None, base, lora_A, lora_B,
                   u if lora_B.requires_grad else None, scalars, segments, seed)

    def save(self, ctx, plan, has_bias):
        *segment_tensors, max_rank = segment_args(self.segments)
        scalar_pack = self.scalars if isinstance(self.scalars, torch.Tensor) else None
        if scalar_pack is None:
            ctx.scalar_values = self.scalars
        ctx.save_for_backward(self.x, self.base.weight, self.base.absmax, self.base.table, self.base.nested,
                              self.lora_A, self.lora_B, self.u, scalar_pack, *segment_tensors, self.seed)
        ctx.segment_max_rank = max_rank
        ctx.blocksizes = (self.base.blocksize, self.base.nested_blocksize)
        ctx.plan = plan
        ctx.has_bias = has_bias

    @classmethod
    def load(cls, ctx):
        x, weight, absmax, table, nested, lora_A, lora_B, u, scalars, *segments, seed = ctx.saved_tensors
        if scalars is None:
            scalars = ctx.scalar_values
        if lora_A is None and getattr(ctx, "parts", None) is not None:  # `EagerLoRALinear`'s parts
            lora_A, lora_B = ctx.parts.concatenated()
        blocksize, nested_blocksize = ctx.blocksizes
        base = BaseOpArgs(weight, absmax, table, blocksize, nested, nested_blocksize)
        return cls(x, base, lora_A, lora_B, u, scalars, segments_of(*segments, ctx.segment_max_rank), seed)


def _autocast_off(device_type):
    # Entering an autocast context costs microseconds per call: only when autocast is on.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _adapter(lora_A, lora_B, scalars, segments=None, seed=None):
    """The `Adapter` of the scalar pack's values; a device seed tensor, where given, replaces the pack's seed."""
    pack_seed, scaling, dropout_p = scalars if type(scalars) is tuple else unpack_scalars(scalars)
    return Adapter(lora_A, lora_B, scaling, dropout_p, pack_seed if seed is None else seed, segments)


def _forward(x, base, bias, lora_A, lora_B, scalars, plan, segments=None, seed=None):
    """(y [M, N], u [M, R] fp32): the forward body of both paths; base: a `BaseOpArgs`."""
    # Operand dtypes were settled by `lora_linear` (autocast included): no casting inside.
    with _autocast_off(x.device.type):
        return ops.lora_forward(x, base.description(bias), _adapter(lora_A, lora_B, scalars, segments, seed), plan)


def _backward(dy, state, plan, needs):
    """(dx, dA, dB), None where `needs` does not ask: the backward body of both paths."""
    with _autocast_off(dy.device.type):
        return ops.lora_backward(dy, state.x, state.u, state.base.description(),
                                 _adapter(state.lora_A, state.lora_B, state.scalars, state.segments, state.seed), plan,
                                 needs)


@torch.library.custom_op("lorakernels::lora_linear_forward", mutates_args=())
def lora_linear_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           lora_A: torch.Tensor, lora_B: torch.Tensor, scalars: torch.Tensor, backend: str,
                           base_gemm: str, tf32: bool, weight_absmax: Optional[torch.Tensor] = None,
                           weight_table: Optional[torch.Tensor] = None, weight_blocksize: int = 0,
                           weight_nested: Optional[torch.Tensor] = None, weight_nested_blocksize: int = 0,
                           row_segment: Optional[torch.Tensor] = None,
                           segment_rank_start: Optional[torch.Tensor] = None,
                           segment_scale: Optional[torch.Tensor] = None,
                           segment_max_rank: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], u [M, R] fp32 (R: the segments' max_rank with segments)) for 2-D x with a unit
    last-dim stride (see `lora_linear`).

    scalars: `pack_scalars`'s tensor; backend, base_gemm, tf32: `LaunchPlan.to_op_args()`.
    weight, weight_absmax, weight_table, weight_blocksize, weight_nested, weight_nested_blocksize: a
    `BaseOpArgs` (a dense W [N, K] and the defaults, or a 4-bit W's codes [N, K / 2] with its absmax,
    code table, blocksize and, under double quantization, its packed nested scales and their
    blocksize).
    row_segment, segment_rank_start, segment_scale, segment_max_rank: several adapters in one batch
    (`Segments`), or None and 0.
    """
    base = BaseOpArgs(weight, weight_absmax, weight_table, weight_blocksize, weight_nested,
                      weight_nested_blocksize)
    return _forward(x, base, bias, lora_A, lora_B, scalars, LaunchPlan.from_op_args(backend, base_gemm, tf32),
                    segments_of(row_segment, segment_rank_start, segment_scale, segment_max_rank))


@lora_linear_forward_op.register_fake
def _forward_fake(x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm, tf32, weight_absmax=None,
                  weight_table=None, weight_blocksize=0, weight_nested=None, weight_nested_blocksize=0,
                  row_segment=None, segment_rank_start=None, segment_scale=None, segment_max_rank=0):
    rank_width = lora_A.shape[0] if row_segment is None else segment_max_rank
    return (x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], rank_width), dtype=torch.float32))


@torch.library.custom_op("lorakernels::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(dy: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor,
                            lora_A: torch.Tensor, lora_B: torch.Tensor, u: Optional[torch.Tensor],
                            scalars: torch.Tensor, backend: str, base_gemm: str, tf32: bool, needs_dx: bool,
                            needs_da: bool, needs_db: bool, weight_absmax: Optional[torch.Tensor] = None,
                            weight_table: Optional[torch.Tensor] = None, weight_blocksize: int = 0,
                            weight_nested: Optional[torch.Tensor] = None, weight_nested_blocksize: int = 0,
                            row_segment: Optional[torch.Tensor] = None,
                            segment_rank_start: Optional[torch.Tensor] = None,
                            segment_scale: Optional[torch.Tensor] = None, segment_max_rank: int = 0
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor.

    x, weight (with weight_absmax, weight_table, weight_blocksize, weight_nested, weight_nested_blocksize),
    lora_A, lora_B, u, scalars and the segments: a `SavedState`; backend, base_gemm, tf32 as the forward's.
    """
    base = BaseOpArgs(weight, weight_absmax, weight_table, weight_blocksize, weight_nested,
                      weight_nested_blocksize)
    state = SavedState(x, base, lora_A, lora_B, u, scalars,
                       segments_of(row_segment, segment_rank_start, segment_scale, segment_max_rank))
    grads = _backward(dy, state, LaunchPlan.from_op_args(backend, base_gemm, tf32),
                      GradsNeeded(needs_dx, needs_da, needs_db))
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@lora_linear_backward_op.register_fake
def _backward_fake(dy, x, weight, lora_A, lora_B, u, scalars, backend, base_gemm, tf32, needs_dx, needs_da,
                   needs_db, weight_absmax=None, weight_table=None, weight_blocksize=0, weight_nested=None,
                   weight_nested_blocksize=0, row_segment=None, segment_rank_start=None, segment_scale=None,
                   segment_max_rank=0):
    in_features = BaseOpArgs(weight, weight_absmax, weight_table, weight_blocksize).shape[1]
    return (dy.new_empty((dy.shape[0], in_features) if needs_dx else (0,)),
            lora_A.new_empty(lora_A.shape if needs_da else (0,)),
            lora_B.new_empty(lora_B.shape if needs_db else (0,)))


def _backward_by_op(dy, state, plan, needs):
    return lora_linear_backward_op(dy, state.x, state.base.weight, state.lora_A, state.lora_B, state.u, state.scalars,
                                   *plan.to_op_args(), *needs, *state.base[1:], *segment_args(state.segments))


_NO_DOUBLE_BACKWARD = (
    b"lora_linear does not support second-order gradients: its backward (fused kernels) is not itself "
    b"differentiable. A gradient computed with create_graph=True through a LoRA layer (a gradient penalty, "
    b"double backward) cannot be differentiated again; compute that term without the LoRA layer, or through "
    b"lorakernels.lora_linear_ref.")


class _GradientsWithoutDerivative(torch.autograd.Function):
    """The first-order gradients of a create_graph backward, as outputs of a node whose inputs are
    everything they depend on (dY, x, the adapter factors): differentiating them again, with
    respect to anything, reaches this node, whose backward raises. (A node over detached copies
    would be skipped by an autograd.grad aimed at the adapters or the input, and their
    second-order terms silently dropped.)"""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD.decode())


def _refuse_double_backward(grads, dependencies):
    """Under create_graph=True, the gradients behind a `_GradientsWithoutDerivative` node over
    `dependencies` (both backends alike: the Triton kernels have no derivative, and the torch
    backend's formulas run without a graph). Without create_graph, the gradients unchanged."""
    tensors = [g for g in grads if g is not None]
    if not torch.is_grad_enabled() or not tensors:
        return grads
    inputs = [t for t in dependencies if t is not None and t.requires_grad]
    guarded = iter(_GradientsWithoutDerivative.apply(len(tensors), *tensors, *inputs))
    return tuple(next(guarded) if g is not None else None for g in grads)


def _grads_of_inputs(ctx, dy, backward):
    """The gradients of (x, weight, bias, lora_A, lora_B, scalars), then None for each other argument."""
    needs_dx, _, needs_dbias, needs_da, needs_db = ctx.needs_input_grad[:5]
    create_graph = torch.is_grad_enabled()
    state = SavedState.load(ctx)
    if create_graph and needs_dx and needs_db and state.x is None:
        # dB = s dY^T U with U = dropout(x) A^T: its derivative in x needs x, not kept with lora_A frozen.
        raise RuntimeError(_NO_DOUBLE_BACKWARD.decode() + " (With lora_A frozen, x is not kept for backward, "
                           "so even create_graph=True is refused where x and lora_B require grad.)")
    dx = da = db = None
    # Backward runs without grad mode unless create_graph: only then does it need switching off.
    with torch.no_grad() if create_graph else contextlib.nullcontext():
        if needs_dx or needs_da or needs_db:
            needs = GradsNeeded(needs_dx, needs_da, needs_db)
            dx, da, db = backward(dy.contiguous(), state, ctx.plan, needs)
        dbias = dy.sum(0) if ctx.has_bias and needs_dbias else None
    grads = (dx if needs_dx else None, None, dbias, da if needs_da else None, db if needs_db else None, None)
    if create_graph:
        parts = getattr(ctx, "parts", None)
        factors = parts.originals if parts is not None else (state.lora_A, state.lora_B)
        grads = _refuse_double_backward(grads, (dy, state.x, *factors))
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalars, backend, base_gemm, tf32, *optional = inputs
    four_bit, segments = optional[:5], (*optional[5:], None, None, None, 0)[:4]  # defaults when not passed
    state = SavedState.of_forward(x, BaseOpArgs(weight, *four_bit), lora_A, lora_B, output[1], scalars,
                                  segments_of(*segments))
    state.save(ctx, LaunchPlan.from_op_args(backend, base_gemm, tf32), bias is not None)


def _op_backward(ctx, dy, du):
    del du  # U is an internal output: nothing flows back through it
    return _grads_of_inputs(ctx, dy, _backward_by_op)


lora_linear_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class EagerCall(NamedTuple):
    """What an eager call passes through autograd besides the tensors autograd tracks: its
    `LaunchPlan`, the base weight's `BaseOpArgs` (its .weight is the `weight` argument), the
    scalars (seed, scaling, dropout_p) as Python numbers (no scalar pack: a tensor built per call
    and read back costs microseconds), the several-adapter `Segments` (or None) and, with segments,
    the (adapter index, lora_A, lora_B) triples whose factors lora_A and lora_B concatenate (or None)."""

    plan: LaunchPlan
    base: BaseOpArgs
    scalars: tuple
    segments: Optional[Segments] = None
    parts: Optional[tuple] = None
    seed: Optional[torch.Tensor] = None  # a device seed (`device_seed`) replacing the scalar pack's


class EagerLoRALinear(torch.autograd.Function):
    """The same forward, backward and saved state as the custom ops, for eager mode.

    apply(x, weight, bias, lora_A, lora_B, call) -> y: the custom op's tensors, then an
    `EagerCall` with the rest (plan, base weight, segments) as objects, not flattened to the op's
    plain arguments.

    A custom op call goes through the dispatcher, the registered autograd wrapper and a
    torch.compile guard, in both directions: on a 2-core CPU that added about 175 us of Python
    per layer per forward + backward, the order of a GPU's time for the GEMMs of a layer with
    a few thousand tokens, so eager training would wait on the host. torch.compile keeps
    using the custom ops (`lora_linear` switches on `torch.compiler.is_compiling()`), where
    that cost is paid once, at tracing. Every argument of `apply` costs Python too (autograd
    inspects each), hence the one `EagerCall`.

    With several adapters (segments), backward concatenates the `parts` again instead of keeping
    the concatenation (a copy of every adapter in the batch, per layer) from forward to backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, call):
        y, u = _forward(x, call.base, bias, lora_A, lora_B, call.scalars, call.plan, call.segments, call.seed)
        state = SavedState.of_forward(x, call.base, lora_A, lora_B, u, call.scalars, call.segments, call.seed)
        if call.parts is not None:
            state = state._replace(lora_A=None, lora_B=None)
            ctx.parts = _ConcatenatedParts(call.parts)
        state.save(ctx, call.plan, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads_of_inputs(ctx, dy, _backward)


class _ConcatenatedParts:
    """The adapters whose factors a segmented call concatenated, kept by reference (they are
    parameters: no copy) with their versions, so that backward rebuilds the concatenation and,
    like autograd's saved tensors, refuses factors modified in place since forward."""

    def __init__(self, parts):
        self.ids = [a for a, _, _ in parts]
        self.parts = tuple((A.detach(), B.detach()) for _, A, B in parts)  # detached views share the version
        self.originals = tuple(t for _, A, B in parts for t in (A, B))  # what a create_graph backward depends on
        self.versions = [(A._version, B._version) for A, B in self.parts]

    def concatenated(self):
        for a, (A, B), versions in zip(self.ids, self.parts, self.versions):
            if (A._version, B._version) != versions:
                raise RuntimeError(f"adapter {a}'s lora_A or lora_B (of a several-adapter lora_linear call) was "
                                   f"modified in place between forward and backward: the gradient would use the "
                                   f"new values")
        return torch.cat([A for A, _ in self.parts]), torch.cat([B for _, B in self.parts], dim=1)
