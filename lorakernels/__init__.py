"""lorakernels: fused Triton kernels for LoRA fine-tuning."""

from lorakernels._interpreter import apply_interpreter_fixes

# Before anything runs a kernel: under TRITON_INTERPRET=1 the interpreter computes bf16 wrong
# without these fixes (see lorakernels._interpreter); otherwise a no-op.
apply_interpreter_fixes()

from lorakernels.adapter_io import load_adapter, save_adapter, save_adapters  # noqa: E402
from lorakernels.autograd import graph_safe_dropout, lora_linear_backward_op, lora_linear_forward_op  # noqa: E402
from lorakernels.functional import lora_linear, lora_linear_segmented  # noqa: E402
from lorakernels.model import (  # noqa: E402
    add_adapter,
    apply_lora,
    delete_adapter,
    disable_adapters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    mixed_batch,
    set_adapter,
    unmerge_lora,
)
from lorakernels.modules import LoRALinear, lora_scaling  # noqa: E402
from lorakernels.peft_patch import PatchReport, patch_peft, peft_patch_stats, unpatch_peft  # noqa: E402
from lorakernels.reference import lora_linear_ref, lora_linear_segmented_ref  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "PatchReport",
    "add_adapter",
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "graph_safe_dropout",
    "load_adapter",
    "lora_linear",
    "lora_linear_backward_op",
    "lora_linear_forward_op",
    "lora_linear_ref",
    "lora_linear_segmented",
    "lora_linear_segmented_ref",
    "lora_scaling",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_and_unload",
    "merge_lora",
    "mixed_batch",
    "patch_peft",
    "peft_patch_stats",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "unmerge_lora",
    "unpatch_peft",
]
