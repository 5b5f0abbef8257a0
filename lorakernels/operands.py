"""What the launchers compute with: the frozen base weight, the adapter, the gradients wanted.

These are the package's two seams for the capabilities that change operands rather than
math:

- the base-weight description (`DenseWeight` today): how the frozen W is stored. It decides
  what validation accepts (`_validation.check_dense_weight`) and, in the kernels, how a weight
  tile is loaded (`lorakernels.kernels.gemm_core.load_weight_tile`). A quantized base (4-bit
  codes with per-block scales) is another description with the same two jobs.
- the adapter description (`Adapter`): the rank-R operands, scaling, dropout and its seed,
  checked by `_validation.check_adapter`; one adapter for every row, or several adapters in one
  batch (`Segments`: their factors concatenated along the rank, a row-to-adapter table and the
  per-adapter scalings, which mask the rank-R intermediates row by row).

The autograd layer builds them from its tensors; the launchers of both backends take them.
"""

import dataclasses
from typing import NamedTuple, Optional

import torch


@dataclasses.dataclass(frozen=True)
class DenseWeight:
    """A dense frozen base layer: weight [N, K] and optional bias [N], both in x's dtype."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @property
    def out_features(self):
        return self.weight.shape[0]

    @property
    def in_features(self):
        return self.weight.shape[1]


class Segments(NamedTuple):
    """Several adapters in one batch, as one adapter of their summed rank.

    The adapters' lora_A are concatenated along the rank ([R, K], R = sum of ranks) and so are
    their lora_B ([N, R]); column j of U = dropout(X) A^T belongs to adapter column_segment[j]
    and row m of X to adapter row_segment[m] (-1: the base layer alone). Masking U and
    V = dY B row by row with `mask()` (column j of row m kept, times its adapter's scaling, only
    where the two agree) turns the one-adapter passes into every row's own adapter:
    y_m = x_m W^T + b + s_a dropout(x_m) A_a^T B_a^T, and each adapter's gradients gather its
    own rows only. The kernels then run with scaling 1.

    row_segment: int32 [M]. column_segment: int32 [R]. column_scale: fp32 [R].
    """

    row_segment: torch.Tensor
    column_segment: torch.Tensor
    column_scale: torch.Tensor

    def mask(self):
        """fp32 [M, R]: column_scale[j] where row m's adapter owns column j, else 0."""
        owned = self.row_segment[:, None] == self.column_segment[None, :]
        return torch.where(owned, self.column_scale[None, :], 0.0)


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

    def mask_rank_rows(self, t):
        """Multiply U or V ([M, R] fp32, in place) by the segments' mask; unchanged without segments."""
        return t if self.segments is None else t.mul_(self.segments.mask())

    @property
    def rank(self):
        return self.lora_A.shape[0]

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
    blocksize: int (bitsandbytes uses 256). offset: float.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    table: torch.Tensor
    blocksize: int
    offset: float

    def expand(self):
        """The fp32 block scales the kernels read [blocks]."""
        per_code = self.scales.repeat_interleave(self.blocksize)[:self.codes.numel()]
        return self.table[self.codes.long()] * per_code + self.offset

    def pack(self):
        """scales, table, blocksize and offset as one fp32 tensor (what crosses the custom ops with
        `codes`): [offset, blocksize, table (256), scales]."""
        head = torch.tensor([self.offset, float(self.blocksize)], dtype=torch.float32, device=self.scales.device)
        return torch.cat([head, self.table.float(), self.scales.float()])

    @classmethod
    def unpack(cls, codes, packed):
        offset, blocksize = packed[:2].tolist()
        return cls(codes, packed[258:], packed[2:258], int(blocksize), offset)

    @classmethod
    def from_bitsandbytes(cls, quant_state):
        """From a nested `QuantState` (its absmax: the 8-bit codes; state2: their scales and table)."""
        state2 = quant_state.state2
        offset = quant_state.offset
        return cls(quant_state.absmax, state2.absmax.float().contiguous(), state2.code.float().contiguous(),
                   int(state2.blocksize), float(offset.item() if isinstance(offset, torch.Tensor) else offset))


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

    @property
    def out_features(self):
        return self.shape[0]

    @property
    def in_features(self):
        return self.shape[1]

    def __post_init__(self):
        N, K = self.shape
        if self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"4-bit blocksize must be a power of two; got {self.blocksize}")
        if K % 2 or N * K >= 2**31:
            raise ValueError(f"a 4-bit weight needs an even in_features and fewer than 2**31 elements (the kernels' "
                             f"32-bit offsets); got shape {tuple(self.shape)}")
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
            table=self.nested.table.to(device))
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
