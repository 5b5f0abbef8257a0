"""lorakernels: fused Triton kernels for LoRA fine-tuning."""

from lorakernels.functional import LoRALinearFunction, lora_linear
from lorakernels.modules import LoRALinear, lora_scaling
from lorakernels.reference import lora_linear_ref

__version__ = "0.1.0"

__all__ = ["LoRALinear", "LoRALinearFunction", "lora_linear", "lora_linear_ref", "lora_scaling"]
