"""Model-level LoRA workflow: adapt the Linear layers of a whole model, train, merge, unload.

PEFT's conventions: `target_modules` is a list of names matched exactly or as a dotted
suffix (`"q_proj"` matches `model.layers.0.self_attn.q_proj`), or a string taken as a
regular expression that must match a whole module name.
"""

import contextlib
import re

import torch
from torch import nn

from lorakernels.modules import LoRALinear


def _matches(name, target_modules):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model, target_modules, types=(nn.Linear,)):
    """Names of the modules of `types` whose names match `target_modules` (PEFT rules)."""
    if isinstance(target_modules, str):
        re.compile(target_modules)  # a bad pattern is an error here, not a silent non-match
    elif not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a regex string or a non-empty list of names; got {target_modules!r}")
    return [name for name, module in model.named_modules()
            if isinstance(module, types) and name and _matches(name, target_modules)]


def _linear_suffixes(model):
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model):
    """(name, LoRALinear) pairs of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, adapter_dtype=None,
               backend=None, base_gemm=None):
    """Replace the matching nn.Linear submodules with LoRALinear (sharing their weights) and freeze
    everything that is not a LoRA parameter. Returns the model (modified in place).

    backend, base_gemm: given to every LoRALinear (see `lora_linear`); None follows the environment.

    Raises ValueError, listing the model's Linear names, when nothing matches; nothing is changed then.
    """
    names = find_target_modules(model, target_modules)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in {type(model).__name__}; "
                         f"its Linear modules end in: {_linear_suffixes(model)}")
    # Build every replacement before swapping any in, so a bad argument leaves the model untouched.
    replacements = [(name, LoRALinear.from_linear(model.get_submodule(name), r=r, lora_alpha=lora_alpha,
                                                  lora_dropout=lora_dropout, use_rslora=use_rslora,
                                                  adapter_dtype=adapter_dtype, backend=backend,
                                                  base_gemm=base_gemm))
                    for name in names]
    for name, module in replacements:
        _set_submodule(model, name, module)
    mark_only_lora_as_trainable(model)
    return model


def mark_only_lora_as_trainable(model):
    """requires_grad = True for lora_A/lora_B of every LoRALinear, False for every other parameter."""
    lora_params = {id(p) for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    return model


def lora_state_dict(model):
    """The adapter weights only: {'<module>.lora_A': ..., '<module>.lora_B': ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(model, keep_original=True):
    """Merge every LoRALinear of the model (see LoRALinear.merge). Returns the model."""
    for _, module in lora_modules(model):
        module.merge(keep_original=keep_original)
    return model


def unmerge_lora(model):
    """Unmerge every merged LoRALinear of the model. Returns the model."""
    for _, module in lora_modules(model):
        if module.merged:
            module.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model):
    """Fold every adapter into its weight and put plain nn.Linear modules back (no LoRA left)."""
    for name, module in lora_modules(model):
        if not module.merged:
            module.merge(keep_original=False)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta", dtype=module.weight.dtype)
        linear.weight = module.weight
        linear.bias = module.bias
        _set_submodule(model, name, linear)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """Within the block, every LoRALinear computes its base layer only (the model must not be merged)."""
    merged = [name for name, m in lora_modules(model) if m.merged]
    if merged:
        raise RuntimeError(f"disable_adapters needs unmerged adapters; merged: {merged[:4]}"
                           f"{' ...' if len(merged) > 4 else ''}. Call unmerge_lora(model) first.")
    modules = [m for _, m in lora_modules(model)]
    previous = [m.adapters_disabled for m in modules]
    for m in modules:
        m.adapters_disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.adapters_disabled = was
