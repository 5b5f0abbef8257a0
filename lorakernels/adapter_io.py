"""Adapter files in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys follow PEFT: `base_model.model.<module name>.lora_A.weight` / `.lora_B.weight`, where
<module name> is the name inside the base model. Files are safetensors only: loading never
unpickles anything. Loading checks the whole file against the model before changing it.
"""

import json
import math
import os

import torch

from lorakernels.model import apply_lora, find_target_modules, lora_modules
from lorakernels.modules import LoRALinear, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def save_adapter(model, path, base_model_name_or_path=None):
    """Write the model's LoRA adapters to directory `path` in PEFT's format.

    All LoRALinear layers must share r, lora_alpha, lora_dropout and use_rslora (one LoraConfig).
    """
    from safetensors.torch import save_file

    layers = lora_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRALinear layers to save")
    hyper = {(m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) for _, m in layers}
    if len(hyper) > 1:
        raise ValueError(f"save_adapter writes one LoraConfig; the layers differ in (r, lora_alpha, lora_dropout, "
                         f"use_rslora): {sorted(hyper)}")
    r, lora_alpha, lora_dropout, use_rslora = hyper.pop()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    tensors = {}
    for name, m in layers:
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_config(path):
    file = os.path.join(path, CONFIG_NAME)
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the adapter config {file}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {k: config[k] for k in ("fan_in_fan_out", "use_dora", "rank_pattern", "alpha_pattern",
                                           "layers_to_transform", "modules_to_save") if config.get(k)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ValueError(f"{file}: unsupported LoRA options {unsupported}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{file}: missing {key!r}")
    if not isinstance(config["r"], int) or not isinstance(config["lora_alpha"], (int, float)) or not math.isfinite(
            config["lora_alpha"]):
        raise ValueError(f"{file}: r must be an int and lora_alpha a number; got {config['r']!r}, "
                         f"{config['lora_alpha']!r}")
    return config


def _read_tensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(file):
        raise ValueError(f"adapter weights not found: {file} (only safetensors files are read)")
    try:
        raw = load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read adapter weights {file} (corrupt or truncated?): {exc}") from exc
    tensors = {}
    for key, value in raw.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        # PEFT writes `<module>.lora_A.weight`; in memory the adapter name may sit in between.
        for part in ("lora_A", "lora_B"):
            for infix in (f".{part}.weight", f".{part}.default.weight"):
                if name.endswith(infix):
                    name = name[: -len(infix)] + "." + part
        tensors[name] = value
    return tensors


def _check_tensors(model, path, targets, tensors, r):
    """Raise ValueError unless `tensors` hold exactly a lora_A and a lora_B per target module, floating
    point and of the shapes that module and rank `r` need, and no target is merged or has an adapter of
    another rank. Reads the model only.
    """
    expected = {f"{name}.{part}": name for name in targets for part in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for key, name in expected.items():
        module = model.get_submodule(name)
        shape = (r, module.in_features) if key.endswith("lora_A") else (module.out_features, r)
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}; the model and r = {r} need {shape}")
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {value.dtype}; expected a floating-point tensor")
        if isinstance(module, LoRALinear) and module.merged:
            raise ValueError(f"{path}: {name} is merged; unmerge the model before loading an adapter into it")
        if isinstance(module, LoRALinear) and module.r != r:
            raise ValueError(f"{path}: rank {r} does not match the model's existing adapter {name} (r = {module.r})")


def load_adapter(model, path, adapter_dtype=None, backend=None):
    """Load a PEFT-format LoRA adapter from directory `path` into `model`.

    Linear layers named by the config's target_modules become LoRALinear (if they are not
    already) with the file's r, lora_alpha, lora_dropout and use_rslora, and get its weights.
    Everything is checked first (config, file integrity, missing and unexpected keys, shapes,
    ranks): on any error a ValueError names the problem and the model is unchanged.
    Returns the model.
    """
    config = _read_config(path)
    tensors = _read_tensors(path)
    r = config["r"]
    targets = find_target_modules(model, config["target_modules"], types=(torch.nn.Linear, LoRALinear))
    if not targets:
        raise ValueError(f"{path}: target_modules {config['target_modules']!r} match no Linear layer of "
                         f"{type(model).__name__}")
    _check_tensors(model, path, targets, tensors, r)

    # Checked: now change the model.
    to_wrap = [name for name in targets if not isinstance(model.get_submodule(name), LoRALinear)]
    hyper = dict(r=r, lora_alpha=config["lora_alpha"], lora_dropout=float(config.get("lora_dropout", 0.0)),
                 use_rslora=bool(config.get("use_rslora", False)))
    if to_wrap:
        apply_lora(model, to_wrap, adapter_dtype=adapter_dtype, backend=backend, **hyper)
    with torch.no_grad():
        for name in targets:
            module = model.get_submodule(name)
            module.lora_alpha, module.lora_dropout, module.use_rslora = (hyper["lora_alpha"], hyper["lora_dropout"],
                                                                         hyper["use_rslora"])
            module.scaling = lora_scaling(r, hyper["lora_alpha"], hyper["use_rslora"])
            module.lora_A.copy_(tensors[f"{name}.lora_A"])
            module.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model
