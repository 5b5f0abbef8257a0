"""lorakernels: fused Triton kernels for LoRA fine-tuning."""

from lorakernels._triton_compat import patch_interpreter_index

patch_interpreter_index()

from lorakernels.adapter_io import load_adapter, save_adapter
from lorakernels.functional import lora_linear, lora_linear_backward_op, lora_linear_forward_op
from lorakernels.model import (
    apply_lora,
    disable_adapters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from lorakernels.modules import LoRALinear, lora_scaling
from lorakernels.reference import lora_linear_ref

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "apply_lora",
    "disable_adapters",
    "load_adapter",
    "lora_linear",
    "lora_linear_backward_op",
    "lora_linear_forward_op",
    "lora_linear_ref",
    "lora_scaling",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_and_unload",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]
