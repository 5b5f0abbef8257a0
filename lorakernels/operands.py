"""What the launchers compute with: the frozen base weight, the adapter, the gradients wanted.

These are the package's two seams for the capabilities that change operands rather than
math:

- the base-weight description: how the frozen W is stored (`DenseWeight`, `FourBitWeight`).
  Every description answers one interface, and nothing above it asks which class it is:
    shape, out_features, in_features, bias   W's (N, K) and the bias the launch adds;
    kind                the name of the GEMM-core kernels that read it (`ops.specs.GEMM_CORES`),
                        and of its kind of call in the base-GEMM strategy's choices;
    dense_weight        the dense W [N, K] that cuBLAS and TMA read as it is, or None (a packed
                        W: only its own fused kernels read it);
    kernel_args(with_base_gemm)  its arguments to those kernels;
    dense(dtype)        W as a dense tensor (the torch backend; a packed W is expanded for the
                        call only);
    named_tensors()     its tensors, named for error messages and device checks;
    check(x, bias, named)  what validation accepts (TypeError / ValueError);
    op_fields()         its tensors and integers as the custom ops' base arguments
                        (`autograd.BaseOpArgs`), the one place it is flattened.
  In the kernels it decides how a weight tile is loaded
  (`lorakernels.kernels.gemm_core.load_weight_tile`). A new storage (an 8-bit W, say) is one
  more class with these members, its tile loader and its GEMM-core specs.
- the adapter description (`Adapter`): the rank-R operands, scaling, dropout and its seed,
  checked by `_validation.check_adapter`; one adapter for every row, or several adapters in one
  batch (`Segments`: their factors concatenated along the rank, a row-to-adapter table, each
  adapter's rank columns and scaling, read by the kernels so that each row computes with its
  own adapter only).

The autograd layer builds them from its tensors; the launchers of both backends take them.
"""

import dataclasses
from typing import NamedTuple, Optional

import torch

from lorakernels import _validation


@dataclasses.dataclass(frozen=True)
class DenseWeight:
    """A dense frozen base layer: weight [N, K] and optional bias [N], both in x's dtype."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    kind = "dense"

    @property
    def shape(self):
        return tuple(self.weight.shape)

    @property
    def out_features(self):
        return self.weight.shape[0]

    @property
    def in_features(self):
        return self.weight.shape[1]

    @property
    def dense_weight(self):
        return self.weight

    def kernel_args(self, with_base_gemm=True):
        """The pointer GEMM-core kernels' weight arguments; with_base_gemm False: they add the LoRA
        term (and bias) alone, cuBLAS adding X W^T."""
        return {"w": self.weight, "BASE_GEMM": with_base_gemm}

    def dense(self, dtype=None):
        return self.weight

    def named_tensors(self):
        return [("weight", self.weight)]

    def check(self, x, bias, named):
        _validation.check_dense_weight(x, self.weight, bias, named)

    def op_fields(self):
        return (self.weight,)


class Segments(NamedTuple):
    """Several adapters in one batch: a row-to-adapter table the kernels read.

    The adapters' lora_A are concatenated along the rank ([R, K], R = sum of ranks) and so are
    their lora_B ([N, R]); adapter (segment) s owns the rank columns rank_start[s] to
    rank_start[s + 1] - 1 of both, and row m of X belongs to segment row_segment[m] (-1: the base
    layer alone). The rank-R intermediates are compact: U = dropout(X) A^T and V = dY B (unscaled
    here) are [M, max_rank], row m holding its own adapter's columns only (zeros past its rank,
    and in the rows of no adapter), so every row computes with its own adapter's rank and nothing
    else: y_m = x_m W^T + b + s_a dropout(x_m) A_a^T B_a^T, and each adapter's gradients gather
    its own rows only. The adapter's scaling s_a (`scale`) is applied wherever its columns are
    used (the LoRA terms of Y and dX, dA, dB); the one-adapter `scaling` is then 1.

    row_segment: int32 [M]. rank_start: int32 [S + 1]. scale: fp32 [S]. max_rank: int, the
    largest rank (U's and V's width).
    """

    row_segment: torch.Tensor
    rank_start: torch.Tensor
    scale: torch.Tensor
    max_rank: int

    @property
    def count(self):
        return self.scale.shape[0]

    def _columns(self):
        """(index int64 [M, max_rank], valid bool [M, max_rank]): column j of row m's compact U is
        column index[m, j] of the concatenated rank, where valid."""
        segment = self.row_segment.long()
        owned = segment >= 0
        start = torch.where(owned, self.rank_start.long()[segment.clamp(min=0)], 0)
        rank = torch.where(owned, self.rank_start.long()[segment.clamp(min=0) + 1] - start, 0)
        j = torch.arange(self.max_rank, device=segment.device)
        valid = j[None, :] < rank[:, None]
        return torch.where(valid, start[:, None] + j[None, :], 0), valid

    def owned_scale(self, rank):
        """fp32 [M, rank] (rank: the summed rank R): column j's adapter scaling where row m's adapter
        owns column j, else 0 (what masks every adapter's columns down to each row's own)."""
        column_segment = torch.repeat_interleave(torch.arange(self.count, device=self.scale.device),
                                                 (self.rank_start[1:] - self.rank_start[:-1]).long(),
                                                 output_size=rank)
        owned = self.row_segment.long()[:, None] == column_segment[None, :]
        return torch.where(owned, self.scale[column_segment][None, :], 0.0)

    def row_scale(self):
        """fp32 [M]: each row's adapter scaling (0 for rows of no adapter)."""
        segment = self.row_segment.long()
        return torch.where(segment >= 0, self.scale[segment.clamp(min=0)], 0.0)

    def compact(self, full):
        """[M, R] (every adapter's columns for every row) -> [M, max_rank] (each row its own)."""
        index, valid = self._columns()
        return torch.where(valid, full.gather(1, index), 0.0)

    def expand(self, compact, rank):
        """[M, max_rank] -> [M, rank] (rank: the summed rank R), each row's columns back at its
        adapter's place, zeros elsewhere."""
        index, valid = self._columns()
        full = compact.new_zeros((compact.shape[0], rank))
        return full.scatter_add_(1, index, torch.where(valid, compact, 0.0))


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter applied to every row: lora_A [R, K], lora_B [N, R] (x's dtype or fp32),
    y += scaling * (dropout(x) A^T) B^T, the dropout mask drawn from `seed` (p = 0: no mask).

    With `segments`, several adapters concatenated along the rank, each row using its own
    (`Segments`); `scaling` is then 1 and the adapters' scalings are the segments'.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0
    seed: int = 0
    segments: Optional[Segments] = None

    @property
    def rank(self):
        """The rank of lora_A / lora_B (with segments: the adapters' summed rank)."""
        return self.lora_A.shape[0]

    @property
    def rank_width(self):
        """The width of U and V: the rank, or with segments the largest adapter's."""
        return self.rank if self.segments is None else self.segments.max_rank

    @property
    def has_dropout(self):
        return self.dropout_p > 0


class GradsNeeded(NamedTuple):
    """Which gradients a backward computes: of x, of lora_A, of lora_B."""

    dx: bool = True
    da: bool = True
    db: bool = True


class NestedScales(NamedTuple):
    """A 4-bit weight's block scales under bitsandbytes' double quantization, kept compressed:
    absmax[i] = table[codes[i]] * scales[i // blocksize] + offset (bitsandbytes' 8-bit
    `dequantize_blockwise`, one multiply in fp32, then its offset: the same bits).

    codes: uint8 [blocks]. scales: fp32 [ceil(blocks / blocksize)]. table: fp32 [256].
    blocksize: int (bitsandbytes uses 256). offset: fp32, 0-dim, on the scales' device (read on the
    host, it would synchronize a GPU at every call).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    table: torch.Tensor
    blocksize: int
    offset: torch.Tensor

    def expand(self):
        """The fp32 block scales the kernels read [blocks]."""
        per_code = self.scales.repeat_interleave(self.blocksize)[:self.codes.numel()]
        return self.table[self.codes.long()] * per_code + self.offset

    def pack(self):
        """offset, table and scales as one fp32 tensor (what crosses the custom ops with `codes` and
        the blocksize): [offset, table (256), scales]."""
        return torch.cat([self.offset.reshape(1).float(), self.table.float(), self.scales.float()])

    @classmethod
    def unpack(cls, codes, packed, blocksize):
        return cls(codes, packed[257:], packed[1:257], blocksize, packed[0])

    @classmethod
    def from_bitsandbytes(cls, quant_state):
        """From a nested `QuantState` (its absmax: the 8-bit codes; state2: their scales and table)."""
        state2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=state2.absmax.device).reshape(())
        return cls(quant_state.absmax, state2.absmax.float().contiguous(), state2.code.float().contiguous(),
                   int(state2.blocksize), offset)


def four_bit_shape_error(shape):
    """Why the kernels cannot read a 4-bit weight of `shape` (N, K): they need an even K (two
    elements a byte along rows) and fewer than 2**31 elements (32-bit offsets); None if they can."""
    N, K = shape
    if K % 2 or N * K >= 2**31:
        return (f"a 4-bit weight needs an even in_features and fewer than 2**31 elements (the kernels' "
                f"32-bit offsets); got shape {tuple(shape)}")
    return None


@dataclasses.dataclass(frozen=True)
class FourBitWeight:
    """A frozen base layer whose weight W [N, K] is in bitsandbytes' 4-bit format (QLoRA).

    codes: uint8, N * K / 2 bytes, W's elements in row-major order two to a byte, the even one in
    the high nibble (bitsandbytes' `Params4bit` data). absmax: fp32, one scale per block of
    `blocksize` consecutive elements; or None under double quantization, with `nested` holding
    the scales compressed (`NestedScales`), expanded for each launch (`with_scales`) and never
    kept: autograd saves the compressed form. table: fp32 [16], the code values (NF4 or FP4).
    bias: [N] in x's dtype, or None. The kernels dequantize tiles in registers; only the torch
    backend (`dequantize`) builds a dense W, for the call's duration.
    """

    codes: torch.Tensor
    absmax: Optional[torch.Tensor]
    table: torch.Tensor
    blocksize: int
    shape: tuple
    bias: Optional[torch.Tensor] = None
    nested: Optional[NestedScales] = None

    kind = "4bit"
    dense_weight = None  # packed: only the 4-bit GEMM-core kernels read it

    @property
    def out_features(self):
        return self.shape[0]

    @property
    def in_features(self):
        return self.shape[1]

    def kernel_args(self, with_base_gemm=True):
        """The 4-bit GEMM-core kernels' weight arguments (double quantization: the fp32 scales
        expanded for this launch only). They always compute X W^T (nothing else reads the codes)."""
        if not with_base_gemm:
            raise ValueError("a 4-bit base weight is multiplied by its own kernels only (base_gemm 'triton')")
        base = self.with_scales()
        return dict(codes=base.codes, absmax=base.absmax, table=base.table, quant_shift=base.quant_shift)

    def dense(self, dtype):
        return self.dequantize(dtype)

    def named_tensors(self):
        """The codes, the block scales (or their nested form) and the code table."""
        scales = (("weight absmax", self.absmax),) if self.absmax is not None else (
            ("weight nested absmax codes", self.nested.codes), ("weight nested scales", self.nested.scales),
            ("weight nested table", self.nested.table))
        return [("weight codes", self.codes), *scales, ("weight code table", self.table)]

    def check(self, x, bias, named):
        _validation.check_four_bit_weight(x, self, bias, named)

    def op_fields(self):
        """(codes viewed as uint8 [N, K / 2] (the view's shape carries N and K), absmax, table,
        blocksize, nested, nested blocksize): under double quantization absmax is the scales' uint8
        codes and nested the rest of their `NestedScales` (`pack()`), kept compressed across the ops."""
        N, K = self.shape
        if self.nested is not None:
            return (self.codes.view(N, K // 2), self.nested.codes, self.table, self.blocksize, self.nested.pack(),
                    self.nested.blocksize)
        return (self.codes.view(N, K // 2), self.absmax, self.table, self.blocksize)

    @classmethod
    def from_op_fields(cls, codes, absmax, table, blocksize, nested=None, nested_blocksize=0, bias=None):
        """The weight `op_fields` flattened, with `bias`."""
        N, half_K = codes.shape
        if nested is not None:
            return cls(codes.reshape(-1), None, table, blocksize, (N, 2 * half_K), bias,
                       NestedScales.unpack(absmax, nested, nested_blocksize))
        return cls(codes.reshape(-1), absmax, table, blocksize, (N, 2 * half_K), bias)

    def __post_init__(self):
        N, K = self.shape
        if self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"4-bit blocksize must be a power of two; got {self.blocksize}")
        if four_bit_shape_error(self.shape):
            raise ValueError(four_bit_shape_error(self.shape))
        if self.codes.dtype != torch.uint8 or self.codes.numel() * 2 != N * K:
            raise ValueError(f"4-bit codes must be uint8 with N * K / 2 = {N * K // 2} bytes for shape "
                             f"{tuple(self.shape)}; got {self.codes.dtype} with {self.codes.numel()}")
        blocks = -(-N * K // self.blocksize)
        if self.absmax is None and self.nested is None:
            raise ValueError("a 4-bit weight needs its block scales: absmax, or nested (double quantization)")
        if self.absmax is not None and (self.absmax.dtype != torch.float32 or self.absmax.numel() != blocks):
            raise ValueError(f"4-bit absmax must be fp32 with one value per block of {self.blocksize}; got "
                             f"{self.absmax.dtype} with {self.absmax.numel()} for shape {tuple(self.shape)}")
        if self.absmax is None and (self.nested.codes.dtype != torch.uint8 or self.nested.codes.numel() != blocks
                                    or self.nested.table.numel() != 256
                                    or self.nested.scales.numel() != -(-blocks // self.nested.blocksize)):
            raise ValueError(f"4-bit nested scales must be {blocks} uint8 codes, a 256-entry table and one scale per "
                             f"{self.nested.blocksize} codes; got {self.nested.codes.dtype} x "
                             f"{self.nested.codes.numel()}, {self.nested.table.numel()}, {self.nested.scales.numel()}")
        if self.table.dtype != torch.float32 or self.table.numel() != 16:
            raise ValueError(f"4-bit code table must be 16 fp32 values; got {self.table.dtype} "
                             f"{tuple(self.table.shape)}")

    @property
    def quant_shift(self):
        return self.blocksize.bit_length() - 1

    @classmethod
    def from_bitsandbytes(cls, codes, quant_state, bias=None):
        """From a `bitsandbytes.nn.Params4bit`'s data and its `QuantState` (nested or not); the
        tensors are the state's own (no copy, nothing expanded)."""
        nested = NestedScales.from_bitsandbytes(quant_state) if quant_state.nested else None
        absmax = None if nested is not None else quant_state.absmax.float().contiguous()
        return cls(codes.reshape(-1), absmax, quant_state.code.float().contiguous(), int(quant_state.blocksize),
                   tuple(quant_state.shape), bias, nested)

    def to(self, device):
        """This weight's tensors on `device` (copies where it is another device)."""
        nested = None if self.nested is None else self.nested._replace(
            codes=self.nested.codes.to(device), scales=self.nested.scales.to(device),
            table=self.nested.table.to(device), offset=self.nested.offset.to(device))
        return dataclasses.replace(self, codes=self.codes.to(device), table=self.table.to(device), nested=nested,
                                   absmax=None if self.absmax is None else self.absmax.to(device),
                                   bias=None if self.bias is None else self.bias.to(device))

    def with_scales(self):
        """This weight with its fp32 block scales expanded (itself when they are already)."""
        return self if self.absmax is not None else dataclasses.replace(self, absmax=self.nested.expand())

    def dequantize(self, dtype):
        """W as a dense [N, K] tensor of `dtype` (the torch backend's and the tests' reference)."""
        nibbles = torch.stack([self.codes >> 4, self.codes & 0xF], dim=-1).reshape(-1).long()
        scales = self.with_scales().absmax.repeat_interleave(self.blocksize)[:nibbles.numel()]
        return (self.table[nibbles] * scales).reshape(self.shape).to(dtype)
