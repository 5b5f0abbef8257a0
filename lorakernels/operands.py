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
