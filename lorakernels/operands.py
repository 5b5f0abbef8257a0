"""What the launchers compute with: the frozen base weight, the adapter, the gradients wanted.

These are the package's two seams for the capabilities that change operands rather than
math:

- the base-weight description (`DenseWeight` today): how the frozen W is stored. It decides
  what validation accepts (`_validation.check_dense_weight`) and, in the kernels, how a weight
  tile is loaded (`lorakernels.kernels.gemm_core.load_weight_tile`). A quantized base (4-bit
  codes with per-block scales) is another description with the same two jobs.
- the adapter description (`Adapter` today: one adapter for every row): the rank-R operands,
  scaling, dropout and its seed, checked by `_validation.check_adapter`. Several adapters in
  one batch become a description with per-segment operands and a row-to-segment table.

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


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter applied to every row: lora_A [R, K], lora_B [N, R] (x's dtype or fp32),
    y += scaling * (dropout(x) A^T) B^T, the dropout mask drawn from `seed` (p = 0: no mask)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0
    seed: int = 0

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


@dataclasses.dataclass(frozen=True)
class FourBitWeight:
    """A frozen base layer whose weight W [N, K] is in bitsandbytes' 4-bit format (QLoRA).

    codes: uint8, N * K / 2 bytes, W's elements in row-major order two to a byte, the even one in
    the high nibble (bitsandbytes' `Params4bit` data). absmax: fp32, one scale per block of
    `blocksize` consecutive elements (double quantization already expanded). table: fp32 [16],
    the code values (NF4 or FP4). bias: [N] in x's dtype, or None. The kernels dequantize tiles
    in registers; only the torch backend (`dequantize`) builds a dense W, for the call's duration.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    table: torch.Tensor
    blocksize: int
    shape: tuple
    bias: Optional[torch.Tensor] = None

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
        if self.absmax.dtype != torch.float32 or self.absmax.numel() != -(-N * K // self.blocksize):
            raise ValueError(f"4-bit absmax must be fp32 with one value per block of {self.blocksize}; got "
                             f"{self.absmax.dtype} with {self.absmax.numel()} for shape {tuple(self.shape)}")
        if self.table.dtype != torch.float32 or self.table.numel() != 16:
            raise ValueError(f"4-bit code table must be 16 fp32 values; got {self.table.dtype} "
                             f"{tuple(self.table.shape)}")

    @property
    def quant_shift(self):
        return self.blocksize.bit_length() - 1

    @classmethod
    def from_bitsandbytes(cls, codes, quant_state, bias=None):
        """From a `bitsandbytes.nn.Params4bit`'s data and its `QuantState` (nested or not)."""
        from bitsandbytes.functional import dequantize_blockwise

        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
        return cls(codes.reshape(-1), absmax.float().contiguous(), quant_state.code.float().contiguous(),
                   int(quant_state.blocksize), tuple(quant_state.shape), bias)

    def dequantize(self, dtype):
        """W as a dense [N, K] tensor of `dtype` (the torch backend's and the tests' reference)."""
        nibbles = torch.stack([self.codes >> 4, self.codes & 0xF], dim=-1).reshape(-1).long()
        scales = self.absmax.repeat_interleave(self.blocksize)[:nibbles.numel()]
        return (self.table[nibbles] * scales).reshape(self.shape).to(dtype)
