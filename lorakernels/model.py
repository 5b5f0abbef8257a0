"""Model-level LoRA workflow: adapt the Linear layers of a whole model, train, merge, unload.

PEFT's conventions: `target_modules` is a list of names matched exactly or as a dotted
suffix (`"q_proj"` matches `model.layers.0.self_attn.q_proj`), or a string taken as a
regular expression that must match a whole module name.

Several adapters may cover different layers (adapter "a" on q_proj and v_proj, "b" on o_proj
too), with PEFT's rules: a layer that lacks the active adapter runs as its base layer; loading
an adapter never changes which adapter is active (the layers it wraps take the model's active
adapter); a mixed batch routes the rows of an adapter to the base on the layers that lack it.
"""

import contextlib
import re
import warnings

import torch
from torch import nn

from lorakernels._validation import memory_span, spans_overlap
from lorakernels.modules import BASE_ONLY, LoRALinear, four_bit_merge_error, tied_weight_error


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


def _bypassed(model, name):
    """Why PyTorch never calls the forward of the Linear `name` (its parent reads its weight directly), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return f"{name} (nn.MultiheadAttention passes {child}.weight to F.multi_head_attention_forward)"
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
        return f"{name} (nn.TransformerEncoderLayer's fast path passes {child}.weight to a fused kernel)"
    return None


def _check_not_bypassed(model, names):
    bypassed = [reason for reason in (_bypassed(model, name) for name in names) if reason]
    if bypassed:
        raise ValueError("apply_lora cannot adapt Linear layers whose weights PyTorch reads directly, bypassing their "
                         "forward, so that an adapter there would be silently ignored: " + "; ".join(bypassed)
                         + ". Leave them out of target_modules; nothing was changed.")


def _tied_parameters(model, names):
    """{name: ((parameter name, parameter), ...)} for each module `name` whose weight shares memory
    with parameters of the model outside that module (tied weights)."""
    spans = [(n, p, memory_span(p)) for n, p in model.named_parameters(remove_duplicate=False)]
    tied = {}
    for name in filter(None, names):  # "" is the model itself: nothing is outside it
        weight, inside = model.get_submodule(name).weight, name + "."
        span = memory_span(weight)
        others = tuple((n, p) for n, p, s in spans
                       if (p is weight or spans_overlap(span, s)) and not n.startswith(inside))
        if others:
            tied[name] = others
    return tied


def lora_modules(model):
    """(name, LoRALinear) pairs of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, adapter_dtype=None,
               backend=None, base_gemm=None):
    """Replace the matching nn.Linear submodules with LoRALinear (sharing their weights) and freeze
    everything that is not a LoRA parameter. Returns the model (modified in place).

    backend, base_gemm: given to every LoRALinear (see `lora_linear`); None follows the environment.
    bitsandbytes `Linear4bit` layers (nn.Linear subclasses) are matched too and keep their 4-bit
    weights (QLoRA; see `LoRALinear`); their adapters default to fp32.

    Raises ValueError, listing the model's Linear names, when nothing matches, and naming them when
    a match is a Linear whose weight PyTorch reads without calling it (the out_proj of
    nn.MultiheadAttention, linear1/linear2 of nn.TransformerEncoderLayer); nothing is changed then.
    Warns for a match whose weight is tied to another parameter (a tied lm_head): such a layer
    trains, but merging it in place is refused until it is untied.
    """
    names = find_target_modules(model, target_modules)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in {type(model).__name__}; "
                         f"its Linear modules end in: {_linear_suffixes(model)}")
    _check_not_bypassed(model, names)
    tied = _tied_parameters(model, names)
    # Build every replacement before swapping any in, so a bad argument leaves the model untouched.
    replacements = [(name, LoRALinear.from_linear(model.get_submodule(name), r=r, lora_alpha=lora_alpha,
                                                  lora_dropout=lora_dropout, use_rslora=use_rslora,
                                                  adapter_dtype=adapter_dtype, backend=backend,
                                                  base_gemm=base_gemm))
                    for name in names]
    for name, module in replacements:
        module.tied_to = tied.get(name, ())
        _set_submodule(model, name, module)
    for name, others in tied.items():
        warnings.warn(f"apply_lora: {name}.weight is tied to {[n for n, _ in others]} (they share memory). The "
                      f"adapter trains as usual, but merging it in place would change those too: merge_lora, "
                      f"merge_and_unload and LoRALinear.merge refuse it until {name} is untied.", stacklevel=2)
    mark_only_lora_as_trainable(model)
    return model


def mark_only_lora_as_trainable(model):
    """requires_grad = True for lora_A/lora_B of every LoRALinear, False for every other parameter."""
    lora_params = {id(p) for _, m in lora_modules(model)
                   for p in (m.lora_A, m.lora_B, *m.extra_adapters.parameters())}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    return model


def _lora_layers_or_error(model, action):
    layers = lora_modules(model)
    if not layers:
        raise ValueError(f"{action}: {type(model).__name__} holds no LoRALinear layer (apply_lora first)")
    return layers


def _check_none_merged(layers, action):
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"{action}: {merged[:4]} {'are' if len(merged) > 1 else 'is'} merged; unmerge_lora(model) "
                           f"first; nothing was changed")


def add_adapter(model, adapter_name, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False):
    """Add adapter `adapter_name` to every LoRALinear layer of `model` (trainable, lora_B zeros), as
    PEFT's `add_adapter`; the active adapter stays. Checked on every layer before any changes."""
    layers = _lora_layers_or_error(model, "add_adapter")
    for name, layer in layers:
        if adapter_name in layer.adapter_names:
            raise ValueError(f"{name} has an adapter {adapter_name!r} already; nothing was changed")
    _check_none_merged(layers, "add_adapter")
    layers[0][1]._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)  # same on every layer
    for _, layer in layers:
        layer.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
    return model


def _held_adapters(layers):
    """The adapter names the layers hold, in the order they first appear."""
    return list(dict.fromkeys(adapter for _, layer in layers for adapter in layer.adapter_names))


def set_adapter(model, adapter_name):
    """Make `adapter_name` the adapter every LoRALinear layer's forward, merge and unmerge use, as
    PEFT's `set_adapter`: the layers that do not hold it run as their base layers. ValueError, and
    nothing changed, when no layer holds it; RuntimeError when a layer is merged."""
    layers = _lora_layers_or_error(model, "set_adapter")
    held = _held_adapters(layers)
    if adapter_name not in held:
        raise ValueError(f"no adapter {adapter_name!r} on any LoRALinear layer of {type(model).__name__} (its "
                         f"adapters: {held}); nothing was changed")
    _check_none_merged(layers, "set_adapter")
    for _, layer in layers:
        layer.active_adapter = adapter_name
    return model


def active_adapter(model):
    """The adapter the LoRALinear layers of `model` use (`set_adapter`), or None without such layers.
    ValueError when the layers were set to different ones (`LoRALinear.set_adapter` per layer)."""
    active = list(dict.fromkeys(layer.active_adapter for _, layer in lora_modules(model)))
    if len(active) > 1:
        raise ValueError(f"the LoRALinear layers of {type(model).__name__} have different active adapters {active}: "
                         f"set_adapter(model, name) chooses one for the model")
    return active[0] if active else None


def delete_adapter(model, adapter_name):
    """Delete adapter `adapter_name` from every LoRALinear layer that holds it, as PEFT's
    `delete_adapter`: where it is a layer's own adapter, the layer's first added one becomes its own
    (`LoRALinear.delete_adapter`); a layer whose only adapter it is becomes its base nn.Linear again
    (sharing its weight and bias), as a PEFT layer without adapters computes its base layer. Where
    it was the active adapter, every layer falls back to its own adapter, those that did not hold
    it included (PEFT's layers fall back to their first adapter).

    Checked on every layer before any changes: ValueError when no layer holds it, or when it is
    the only adapter of a layer over a 4-bit base (no nn.Linear to put back); RuntimeError when it
    is merged (or a layer to put back is merged).
    """
    all_layers = _lora_layers_or_error(model, "delete_adapter")
    layers = [(n, m) for n, m in all_layers if adapter_name in m.adapter_names]
    if not layers:
        raise ValueError(f"no layer of the model has an adapter {adapter_name!r}")
    only = [(n, m) for n, m in layers if m.adapter_names == [adapter_name]]
    four_bit = [n for n, m in only if m.four_bit]
    if four_bit:
        raise ValueError(f"{adapter_name!r} is the only adapter of {four_bit[:4]}, over a 4-bit base: deleting it "
                         f"would leave a layer without adapters, and lorakernels does not rebuild a bitsandbytes "
                         f"Linear4bit; nothing was changed")
    active = [(n, m) for n, m in all_layers if m.active_adapter == adapter_name]
    _check_none_merged(active + [(n, m) for n, m in only if m.active_adapter != adapter_name], "delete_adapter")
    for name, layer in only:
        base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                         dtype=layer.weight.dtype)
        base.weight, base.bias = layer.weight, layer.bias
        _set_submodule(model, name, base)
    for _, layer in layers:
        if layer.adapter_names != [adapter_name]:
            layer.delete_adapter(adapter_name)
    for _, layer in active:
        layer.active_adapter = layer.adapter_name
    return model


@contextlib.contextmanager
def mixed_batch(model, adapter_names):
    """Within the block, every LoRALinear layer of `model` runs PEFT-style mixed batches: sequence i
    (x.shape[0] of each layer's input) through adapter `adapter_names[i]` ("__base__": none), all
    in one fused pass per layer. PEFT passes `adapter_names=` to the model's forward; a
    transformers model does not forward that argument to its layers, hence the block:

        with lorakernels.mixed_batch(model, ["math", "__base__", "code"]):
            logits = model(input_ids).logits

    As in PEFT, every name must be held by some layer of the model (ValueError otherwise, like
    PEFT's "non-existing adapter"), and on a layer that does not hold it its rows take the base
    layer alone.
    """
    layers = _lora_layers_or_error(model, "mixed_batch")
    names = None if isinstance(adapter_names, str) else list(adapter_names)
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"mixed_batch: adapter_names must be a list of adapter names (one per sequence); got "
                        f"{adapter_names!r}")
    held = _held_adapters(layers)
    unknown = sorted(set(names) - set(held) - {BASE_ONLY})
    if unknown:
        raise ValueError(f"mixed_batch: no LoRALinear layer of {type(model).__name__} holds adapter(s) {unknown} "
                         f"(its adapters: {held}, or {BASE_ONLY!r} for the base alone)")
    for _, layer in layers:
        layer.batch_adapter_names = names
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.batch_adapter_names = None


def lora_state_dict(model):
    """The adapter weights only: {'<module>.lora_A': ..., '<module>.lora_B': ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def _check_untied(model, modules):
    """Refuse, before anything is merged, when a weight to merge is tied to a parameter outside its layer.

    Records the current ties on each layer (`LoRALinear.tied_to`), which `merge()` checks again.
    """
    tied = _tied_parameters(model, [name for name, _ in modules])
    for name, module in modules:
        module.tied_to = tied.get(name, ())
    if tied:
        described = "; ".join(f"{name}.weight with {[n for n, _ in others]}" for name, others in tied.items())
        raise tied_weight_error(described, next(iter(tied)))


def merge_lora(model, keep_original=True):
    """Merge every LoRALinear of the model (see LoRALinear.merge). Returns the model.

    Raises ValueError, before merging anything, when a weight is tied to a parameter outside its layer,
    and TypeError when a layer has a 4-bit base (merge those with `merge_and_unload`).
    """
    modules = lora_modules(model)
    four_bit = [name for name, m in modules if m.four_bit]
    if four_bit:
        raise four_bit_merge_error(f"{four_bit[:4]}{' ...' if len(four_bit) > 4 else ''}")
    _check_untied(model, modules)
    for _, module in modules:
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
    """Fold every adapter into its weight and put plain nn.Linear modules back (no LoRA left).

    A layer over a 4-bit base (QLoRA) becomes a new nn.Linear in its compute dtype: the dequantized
    4-bit weight plus scaling * B @ A, rounded once (`LoRALinear.merged_linear`). That is what the
    4-bit model computes, within one rounding of the compute dtype, but it keeps the 4-bit
    quantization error of the base: it is not the original 16-bit model plus the adapter. It also
    takes 16-bit memory for those weights (4x the 4-bit codes).

    Raises ValueError, before changing anything, when a weight to merge in place is tied to a parameter
    outside its layer (see `merge_lora`).
    """
    modules = lora_modules(model)
    _check_untied(model, [(name, module) for name, module in modules if not module.merged and not module.four_bit])
    for _, module in modules:
        if module.four_bit:
            module.four_bit_base()  # a base the kernels cannot read fails here, before anything changes
    for name, module in modules:
        if module.four_bit:
            _set_submodule(model, name, module.merged_linear())
            continue
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
