"""`LoRALinear` (layer 4): a drop-in nn.Linear with a trainable low-rank adapter."""

import math

import torch
from torch import nn

from lorakernels._validation import check_lora_hyperparameters
from lorakernels.functional import lora_linear


def lora_scaling(r, lora_alpha, use_rslora=False):
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with W and b frozen.

    Args:
        in_features, out_features: as nn.Linear.
        r: adapter rank, 1..256. lora_alpha: scaling numerator. lora_dropout: p on the input of A.
        bias: whether the frozen base has a bias. use_rslora: scaling = alpha / sqrt(r).
        device, dtype: of the frozen base (and of the adapters unless adapter_dtype is given).
        adapter_dtype: dtype of lora_A/lora_B, e.g. torch.float32 with a bf16 base (PEFT's default).
        backend: 'auto' | 'triton' | 'torch' (see `lora_linear`); None follows LORAKERNELS_BACKEND.

    Parameters: weight [out, in] and bias [out] (frozen), lora_A [r, in] (kaiming-uniform,
    a = sqrt(5)) and lora_B [out, r] (zeros, so a fresh adapter leaves the layer unchanged).
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 use_rslora=False, device=None, dtype=None, adapter_dtype=None, backend=None):
        super().__init__()
        check_lora_hyperparameters(in_features, out_features, r, lora_alpha, lora_dropout)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend)

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, adapter_dtype=None,
                    backend=None):
        """Wrap an existing nn.Linear: its weight and bias are shared (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear; got {type(linear).__name__}")
        check_lora_hyperparameters(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init_from(linear, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend)
        return module

    def _init_from(self, base, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend):
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.backend = backend
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT, B zeros: the adapter starts as the identity."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.lora_dropout, self.training, backend=self.backend)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"adapter_dtype={self.lora_A.dtype}")
