"""One line for PEFT users: `patch_peft(model)` runs PEFT's LoRA linears through `lora_linear`.

    import lorakernels
    model = peft.get_peft_model(base_model, lora_config)
    lorakernels.patch_peft(model)          # returns a PatchReport; undo: lorakernels.unpatch_peft(model)

Every PEFT `lora.Linear` in the model gets a forward that, on each call, checks whether the
fused kernels compute exactly what PEFT's forward would (one active vanilla-LoRA adapter on
a plain `nn.Linear` base, ...: `lorakernels._peft_linear.route`) and otherwise calls PEFT's
own forward. So `set_adapter`, `disable_adapter()`, `merge_adapter()` / `unmerge_adapter()`
and DoRA keep PEFT's behaviour while patched. Mixed-batch inference (`model(...,
adapter_names=[...])`) runs `lora_linear_segmented`, one fused pass per layer, with PEFT's rules
for "__base__" rows and for adapters a layer lacks (`_peft_linear.mixed_route`).

How: the layer's class is swapped for a subclass of `peft.tuners.lora.Linear` with the same
name that overrides `forward` only (`module.__class__ = ...`): the parameters, buffers,
state-dict keys, hooks and every other method stay PEFT's, no weight is copied, so save/load,
`get_peft_model_state_dict`, `merge_and_unload`, optimizers, DDP/FSDP and trainers see the
same module. Differences: `type(layer)` is the subclass (`isinstance(layer, lora.Linear)` holds),
a model pickled whole while patched needs lorakernels to unpickle, and dropout masks come from
lorakernels' seeded Philox stream instead of `torch.nn.functional.dropout`'s (same p, same
distribution, different draws).

Routes: `_peft_modules()` maps a PEFT layer class to its fused subclass: `lora.Linear` (over an
`nn.Linear`, or a bitsandbytes `Linear4bit`) and, with bitsandbytes loaded, QLoRA's
`lora.bnb.Linear4bit`, whose 4-bit weight reaches the kernels packed (`operands.FourBitWeight`);
layers of other classes (Embedding, Conv, MultiheadAttention, bitsandbytes 8-bit, GPTQ, ...) are
reported and left alone. A new base plugs in as a new entry: a subclass of PEFT's layer class
mixing in `_peft_linear.FusedRoute`, with its base recognised in `_peft_linear._base_reason`.
"""

import collections
import dataclasses
import logging

from torch import nn

from lorakernels import four_bit
from lorakernels.plan import check_options

logger = logging.getLogger("lorakernels")

_STATE_ATTRS = ("_lorakernels_calls", "_lorakernels_options", "_lorakernels_route")
# The peft release whose `lora.Linear.forward` the per-call conditions mirror, and whose own
# test suite judged them (tests/peft_suite/run.py).
CHECKED_PEFT_VERSION = "0.21.2"
_warned_versions = set()


def _peft_modules():
    """(LoraLayer base class, {PEFT layer class: fused subclass}); ImportError without peft."""
    try:
        from peft.tuners.lora import LoraLayer

        from lorakernels import _peft_linear
    except ImportError as exc:
        raise ImportError("patch_peft needs peft (pip install 'lorakernels[interop]'); "
                          f"importing it failed: {exc}") from exc
    import peft

    if peft.__version__ != CHECKED_PEFT_VERSION and peft.__version__ not in _warned_versions:
        _warned_versions.add(peft.__version__)
        logger.warning("patch_peft mirrors peft %s's lora.Linear.forward; peft %s is installed: run "
                       "tests/peft_suite/run.py to check it", CHECKED_PEFT_VERSION, peft.__version__)
    routes = {_peft_linear.PeftLinear: _peft_linear.Linear}
    if four_bit.loaded_bitsandbytes_nn() is not None and hasattr(_peft_lora_bnb(), "Linear4bit"):
        from lorakernels import _peft_linear4bit

        routes[_peft_linear4bit.PeftLinear4bit] = _peft_linear4bit.Linear4bit
    return LoraLayer, routes


def _peft_lora_bnb():
    """peft's bitsandbytes LoRA layers (`Linear4bit` is defined there when bitsandbytes can run 4-bit)."""
    from peft.tuners.lora import bnb

    return bnb


@dataclasses.dataclass
class PatchReport:
    """What `patch_peft` did.

    patched: names of the LoRA layers whose forward now routes through `lora_linear` when exact.
    fallback_now: of those, the ones whose current state (adapter, modules, dtypes aside) sends
        their next call to PEFT's forward, with the reason; it is checked again on every call.
    not_patched: LoRA layers of a class without a fused route, with the reason.
    """

    patched: list
    fallback_now: dict
    not_patched: dict

    def __str__(self):
        total = len(self.patched) + len(self.not_patched)
        text = f"lorakernels.patch_peft: {len(self.patched)} of {total} LoRA layers patched"
        if self.patched:
            text += f" ({len(self.patched) - len(self.fallback_now)} fused now"
            text += f"; PEFT's forward now: {_tally(self.fallback_now)})" if self.fallback_now else ")"
        if self.not_patched:
            text += f"; not patched: {_tally(self.not_patched)}"
        return text


def _tally(reasons):
    counts = collections.Counter(reasons.values())
    return ", ".join(f"{n} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _state_reason(layer):
    """Why `layer` (patched) would run PEFT's forward now, judging its state alone; None if fused."""
    from lorakernels import _peft_linear

    if "forward" in vars(layer):  # e.g. accelerate's hooks: they call the forward bound before patching
        return "an instance-level forward (accelerate hooks?) bypasses the patched one"
    return _peft_linear.layer_state(layer)[1]


def patch_peft(model, backend=None, base_gemm=None):
    """Route the forward and backward of `model`'s PEFT `lora.Linear` layers through `lora_linear`.

    Args:
        model: a `PeftModel`, or any nn.Module holding PEFT LoRA layers. Patched in place;
            calling it again re-patches new layers and updates the options.
        backend, base_gemm: passed to `lora_linear` on every fused call (None: the environment).
    Returns:
        a `PatchReport` (also logged at INFO on the "lorakernels" logger); `str()` summarises it.
    Raises:
        TypeError if `model` is not an nn.Module; ValueError if it holds no PEFT LoRA layer or an
        option is invalid; ImportError without peft.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft takes an nn.Module (a PeftModel); got {type(model).__name__}")
    check_options(backend, base_gemm)
    lora_layer, routes = _peft_modules()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer)]
    if not layers:
        raise ValueError(f"patch_peft: {type(model).__name__} holds no PEFT LoRA layer "
                         "(apply peft.get_peft_model with a LoraConfig first)")
    fused_classes = set(routes.values())
    report = PatchReport([], {}, {})
    for name, layer in layers:
        fused = layer.__class__ if layer.__class__ in fused_classes else routes.get(layer.__class__)
        if fused is None:
            report.not_patched[name] = f"lora.{type(layer).__name__}: no fused route for this layer type"
            continue
        if layer.__class__ is not fused:
            layer.__class__ = fused
            layer._lorakernels_calls = {}
        layer._lorakernels_options = {"backend": backend, "base_gemm": base_gemm}
        report.patched.append(name)
        reason = _state_reason(layer)
        if reason is not None:
            report.fallback_now[name] = reason
    logger.info("%s", report)
    return report


def _patched_layers(model):
    """(name, layer) of the patched layers, including those whose class a wrapper has since
    swapped for a subclass of the fused one (FSDP2's `fully_shard` does)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module (a PeftModel); got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if hasattr(type(m), "peft_class")
            and "_lorakernels_calls" in m.__dict__]


def unpatch_peft(model):
    """Give every layer `patch_peft` patched in `model` back its PEFT class. Returns how many.

    A layer whose class was swapped again after patching (FSDP2's `fully_shard` makes a subclass
    of it) is left patched, with a warning: restoring PEFT's class would drop the wrapper's.
    """
    restored = 0
    for name, layer in _patched_layers(model):
        if "peft_class" not in vars(type(layer)):
            logger.warning("unpatch_peft: %s left patched: its class %s wraps the patched one",
                           name, type(layer).__qualname__)
            continue
        layer.__class__ = type(layer).peft_class
        for attr in _STATE_ATTRS:
            layer.__dict__.pop(attr, None)
        restored += 1
    return restored


def peft_patch_stats(model, reset=False):
    """Per-call outcomes of the patched layers since patching (or the last reset), for debugging.

    Counted in eager mode only (not inside torch.compile'd code). Returns
    {"fused": calls, "fallback": {reason: calls}, "layers": {name: {"fused" or reason: calls}}}.
    """
    stats = {"fused": 0, "fallback": {}, "layers": {}}
    for name, layer in _patched_layers(model):
        calls = layer._lorakernels_calls
        stats["layers"][name] = dict(calls)
        for outcome, n in calls.items():
            if outcome == "fused":
                stats["fused"] += n
            else:
                stats["fallback"][outcome] = stats["fallback"].get(outcome, 0) + n
        if reset:
            calls.clear()
    return stats
