"""Adapter files in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys follow PEFT: `base_model.model.<module name>.lora_A.weight` / `.lora_B.weight`, where
<module name> is the name inside the base model. Files are safetensors only: loading never
unpickles anything. Loading checks the whole file against the model before changing it.

Integrity: safetensors has no checksum, so `save_adapter` records two SHA-256 digests in the
safetensors header metadata: one of the tensors (names, dtypes, shapes and bytes) and one of the
config fields that loading reads (r, lora_alpha, lora_dropout, use_rslora, target_modules).
`load_adapter` verifies both when present: flipped bytes, or a config and weights from two saves
that differ in those fields, are a ValueError. Files without them (PEFT's) load unverified. The
config file itself carries no digest: PEFT warns about keys it does not know.
"""

import hashlib
import json
import math
import os
import re
import shutil
import uuid

import torch

from lorakernels._validation import MAX_RANK
from lorakernels.model import active_adapter, apply_lora, find_target_modules, lora_modules
from lorakernels.modules import LoRALinear, check_adapter_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TENSORS_DIGEST = "lorakernels.tensors_sha256"
_CONFIG_DIGEST = "lorakernels.config_sha256"

# PEFT options that change what an adapter computes or which modules it has, and that this loader does
# not implement: each must be absent or hold one of these (PEFT's defaults; compared with their types).
_PLAIN_LORA = {
    "fan_in_fan_out": (False,), "use_dora": (False,), "bias": ("none",), "lora_bias": (False,),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None, []),
    "modules_to_save": (None, []), "exclude_modules": (None, []), "layer_replication": (None, []),
    "target_parameters": (None, []), "trainable_token_indices": (None, []), "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
}


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unsupported(config, file):
    bad = {key: config[key] for key in _PLAIN_LORA if key in config
           and not any(type(config[key]) is type(ok) and config[key] == ok for ok in _PLAIN_LORA[key])}
    if bad:
        needs = "; ".join(f"{key!r} absent or " + " or ".join(json.dumps(ok) for ok in _PLAIN_LORA[key]) for key in bad)
        raise ValueError(f"{file}: unsupported LoRA options {bad}; plain LoRA needs {needs}")


def _check_target_modules(value, file):
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{file}: 'target_modules' = {value!r} is not a valid regular expression: {exc}") from exc
        return value
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{file}: 'target_modules' must be a regex string or a non-empty list of module names; "
                         f"got {value!r}")
    return sorted(set(value))


def _parse_config(config, file):
    """Type-check every field loading reads; return them normalised: r, lora_alpha, lora_dropout,
    use_rslora, target_modules (a regex string or a sorted list of names). Raise ValueError naming
    `file`, the key and the value.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{file}: the adapter config must be a JSON object; got {type(config).__name__} "
                         f"{config!r:.80}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: 'peft_type' = {config['peft_type']!r}; only 'LORA' adapters load here")
    _check_unsupported(config, file)
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{file}: missing {key!r}")
    r, alpha = config["r"], config["lora_alpha"]
    dropout, rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise ValueError(f"{file}: 'r' must be an integer in [1, {MAX_RANK}]; got {r!r}")
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise ValueError(f"{file}: 'lora_alpha' must be a finite number; got {alpha!r}")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{file}: 'lora_dropout' must be a number in [0, 1); got {dropout!r}")
    if not isinstance(rslora, bool):
        raise ValueError(f"{file}: 'use_rslora' must be true or false; got {rslora!r}")
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "use_rslora": rslora,
            "target_modules": _check_target_modules(config["target_modules"], file)}


def _config_digest(parsed):
    fields = {**parsed, "lora_alpha": float(parsed["lora_alpha"])}  # 8 and 8.0 are one config
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _tensor_digest(tensors):
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _build_config(layers, base_model_name_or_path, adapter_name):
    hyper = {m.adapter_config(adapter_name) for _, m in layers}
    if len(hyper) > 1:
        raise ValueError(f"save_adapter writes one LoraConfig; the layers differ in (r, lora_alpha, lora_dropout, "
                         f"use_rslora): {sorted(hyper)}")
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str, an os.PathLike or None; got "
                        f"{type(base_model_name_or_path).__name__} {base_model_name_or_path!r}")
    r, lora_alpha, lora_dropout, use_rslora = hyper.pop()
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }


def _fsync_path(path):
    """fsync a file, or a directory (so that renames in it are durable) where the OS allows it."""
    if not os.path.isdir(path):
        flags = os.O_RDWR
    elif hasattr(os, "O_DIRECTORY"):
        flags = os.O_RDONLY | os.O_DIRECTORY
    else:
        return  # Windows cannot open a directory; NTFS journals renames itself
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_old_weights(weights, backup):
    """A second name for the current weights file (a hard link, else a copy), so a failed save can put it back."""
    if not os.path.exists(weights):
        return False
    try:
        os.link(weights, backup)
    except OSError:
        shutil.copy2(weights, backup)
    return True


def _restore(weights, backup, had_old):
    try:
        if had_old:
            os.replace(backup, weights)
        else:
            os.unlink(weights)
    except OSError as exc:
        kept = f"; the previous weights are kept in {backup}" if had_old else ""
        raise OSError(f"save_adapter failed between replacing {WEIGHTS_NAME} and {CONFIG_NAME} in "
                      f"{os.path.dirname(weights)} and could not undo it ({exc}): the new weights sit beside the "
                      f"previous config (if any), which load_adapter refuses unless the two configs agree in every "
                      f"field it reads{kept}") from exc


def _swap_in(directory, tensors, metadata, config_text):
    """Write both files under temporary names in `directory`, fsync them, then replace weights, then config."""
    from safetensors.torch import save_file

    token = uuid.uuid4().hex[:12]
    weights, config = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    tmp_weights, tmp_config, backup = (os.path.join(directory, f".{name}.{token}.{ext}") for name, ext in
                                       ((WEIGHTS_NAME, "tmp"), (CONFIG_NAME, "tmp"), (WEIGHTS_NAME, "old")))
    leftovers = [tmp_weights, tmp_config, backup]
    try:
        save_file(tensors, tmp_weights, metadata=metadata)
        _fsync_path(tmp_weights)
        with open(tmp_config, "w") as f:
            f.write(config_text)
            f.flush()
            os.fsync(f.fileno())
        had_old, replaced = _keep_old_weights(weights, backup), False
        try:
            os.replace(tmp_weights, weights)
            replaced = True
            _fsync_path(directory)  # the weights' rename is durable before the config's starts
            os.replace(tmp_config, config)
        except BaseException:
            if replaced:
                leftovers.remove(backup)  # _restore moves it back, or reports where it is kept
                _restore(weights, backup, had_old)
            raise
        _fsync_path(directory)
    finally:
        for leftover in leftovers:
            if os.path.exists(leftover):
                os.unlink(leftover)


def _layers_with(model, adapter_name, action):
    """The LoRALinear layers holding adapter `adapter_name` (None: each layer's own), with that name per layer."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRALinear layers to {action}")
    if adapter_name is None:
        return [(name, m, m.adapter_name) for name, m in layers]
    held = [(name, m, adapter_name) for name, m in layers if adapter_name in m.adapter_names]
    if not held:
        raise ValueError(f"no LoRALinear layer of {type(model).__name__} has an adapter {adapter_name!r}")
    return held


def save_adapter(model, path, base_model_name_or_path=None, adapter_name=None):
    """Write one of the model's LoRA adapters to directory `path` in PEFT's format.

    adapter_name: which adapter (None: each layer's own, `LoRALinear.adapter_name`); the layers
    holding it must share its r, lora_alpha, lora_dropout and use_rslora (one LoraConfig).
    `save_adapters` writes every adapter, in PEFT's layout.
    base_model_name_or_path: a str, an os.PathLike (stored as a str) or None.

    Everything is built and checked first (config serialised to JSON, digests computed); both files
    are then written under temporary names in `path` and fsynced, and renamed over the old ones with
    os.replace: first the weights, then the config. Each file is thus always whole, old or new. If
    the save fails (an exception, Ctrl-C included) the old weights are put back (or, with no old
    adapter, the new weights removed), leaving the old adapter whole. What remains: a process
    killed or a power loss between the two renames leaves the new weights beside the old config (a
    loader reading in that instant sees the same pair); the digests make `load_adapter` refuse that
    pair (ValueError) unless the two configs agree in every field loading reads, when the pair is
    the new adapter. PEFT's loader does not check the digests.
    Leftover hidden files `.adapter_*.tmp` / `.old` from such a kill are safe to delete. Concurrent
    saves to one directory are not serialised.
    """
    _write(path, *_prepared(model, base_model_name_or_path, adapter_name))


def _prepared(model, base_model_name_or_path, adapter_name):
    """(tensors, metadata, config text) of one adapter, built and checked, nothing written yet."""
    held = _layers_with(model, adapter_name, "save")
    names = sorted({adapter for _, _, adapter in held})
    if len(names) > 1:
        raise ValueError(f"the layers' own adapters have different names {names}: pass adapter_name")
    config = _build_config([(name, m) for name, m, _ in held], base_model_name_or_path, names[0])
    config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    tensors = {}
    for name, m, adapter in held:
        lora_A, lora_B, _, _ = m.adapter_operands(adapter)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_B.detach().contiguous().cpu()
    metadata = {"format": "pt", _TENSORS_DIGEST: _tensor_digest(tensors),
                _CONFIG_DIGEST: _config_digest(_parse_config(config, CONFIG_NAME))}
    return tensors, metadata, config_text


def _write(path, tensors, metadata, config_text):
    os.makedirs(path, exist_ok=True)
    _swap_in(os.fspath(path), tensors, metadata, config_text)


def save_adapters(model, path, base_model_name_or_path=None):
    """Write every adapter of the model as PEFT's `save_pretrained` lays them out: the adapter named
    "default" in `path`, each other one in `path/<adapter name>`. Returns the names saved.

    Every adapter is built and checked before any is written: an adapter whose layers disagree on
    their settings (ValueError) leaves `path` as it was. Each adapter is then written as
    `save_adapter` writes one."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRALinear layers to save")
    names = list(dict.fromkeys(adapter for _, m in layers for adapter in m.adapter_names))
    directories = [_adapter_directory(path, adapter) for adapter in names]
    prepared = [_prepared(model, base_model_name_or_path, adapter) for adapter in names]
    for directory, files in zip(directories, prepared):
        _write(directory, *files)
    return names


def _adapter_directory(path, adapter):
    """Where `save_adapters` writes adapter `adapter`: `path` for "default", else `path/<adapter>`
    (PEFT's `save_pretrained`; a name with '/' makes nested directories, as there). ValueError for a
    name that would lead out of `path` (an absolute one)."""
    if adapter == "default":
        return path
    directory = os.path.join(os.fspath(path), adapter)
    root = os.path.abspath(os.fspath(path))
    inside = os.path.abspath(directory)
    if os.path.commonpath([root, inside]) != root or inside == root:
        raise ValueError(f"save_adapters: adapter {adapter!r} cannot be saved in a directory of its name under "
                         f"{os.fspath(path)!r} (it would be {directory!r}); nothing was written")
    return directory


def _read_config(path):
    file = os.path.join(path, CONFIG_NAME)
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the adapter config {file}: {exc}") from exc
    return _parse_config(config, file)


def _read_tensors(path):
    """The weights file's tensors (as stored) and its header metadata ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(file):
        raise ValueError(f"adapter weights not found: {file} (only safetensors files are read)")
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read adapter weights {file} (corrupt or truncated?): {exc}") from exc
    return raw, metadata


def _verify_digests(path, raw, metadata, parsed):
    """Check the digests save_adapter records, where the weights file has them (PEFT's files do not)."""
    file = os.path.join(path, WEIGHTS_NAME)
    recorded = metadata.get(_TENSORS_DIGEST)
    if recorded is not None and recorded != _tensor_digest(raw):
        raise ValueError(f"{file} fails its integrity check: the SHA-256 of its tensors is not the one recorded when "
                         f"it was saved ({recorded[:16]}...); the file is corrupt")
    recorded = metadata.get(_CONFIG_DIGEST)
    if recorded is not None and recorded != _config_digest(parsed):
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)} and {file} come from different saves: the weights were "
                         f"saved with another r / lora_alpha / lora_dropout / use_rslora / target_modules than the "
                         f"config holds {({k: parsed[k] for k in sorted(parsed)})}; save the adapter again")


def _rename_tensors(path, raw):
    tensors = {}
    for key, value in raw.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        # PEFT writes `<module>.lora_A.weight`; in memory the adapter name may sit in between.
        for part in ("lora_A", "lora_B"):
            for infix in (f".{part}.weight", f".{part}.default.weight"):
                if name.endswith(infix):
                    name = name[: -len(infix)] + "." + part
        if name in tensors:
            raise ValueError(f"{os.path.join(path, WEIGHTS_NAME)}: {key!r} and another key both hold {name}")
        tensors[name] = value
    return tensors


def _check_tensors(model, path, targets, tensors, r, adapter_name=None):
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
        if not isinstance(module, LoRALinear):
            continue
        if module.merged:
            raise ValueError(f"{path}: {name} is merged; unmerge the model before loading an adapter into it")
        adapter = module.adapter_name if adapter_name is None else adapter_name
        if adapter in module.adapter_names and (have := module.adapter_config(adapter)[0]) != r:
            raise ValueError(f"{path}: rank {r} does not match the model's existing adapter {adapter!r} of {name} "
                             f"(r = {have})")


def load_adapter(model, path, adapter_dtype=None, backend=None, adapter_name=None):
    """Load a PEFT-format LoRA adapter from directory `path` into `model`.

    Linear layers named by the config's target_modules become LoRALinear (if they are not
    already) with the file's r, lora_alpha, lora_dropout and use_rslora, and get its weights.
    adapter_name: None loads into each layer's own adapter; a name loads into that adapter of the
    layers, added (`add_adapter`) where a LoRALinear does not hold it yet, or, on a layer wrapped
    now, as the layer's own adapter under that name; so several PEFT adapters can be held at once
    and run together (`mixed_batch`). Any name PEFT accepts (`check_adapter_name`: "math-v2" too).
    The active adapter does not change, as with PEFT's `load_adapter`: the layers wrapped now take
    the model's active adapter (`lorakernels.model.active_adapter`), and where they do not hold it
    they run as their base layers; into a model without LoRA layers the adapter loaded becomes the
    active one. (Adapters may thus cover different layers: see `lorakernels.model`.)
    Everything is checked first, the same way whether or not the model already has LoRA layers:
    every config field read (type and range), the digests save_adapter records (see the module
    docstring), missing and unexpected keys, shapes, ranks. On any error a ValueError names the
    file, key and value, and the model is unchanged. Returns the model.
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    config = _read_config(path)
    raw, metadata = _read_tensors(path)
    _verify_digests(path, raw, metadata, config)
    tensors = _rename_tensors(path, raw)
    r = config["r"]
    targets = find_target_modules(model, config["target_modules"], types=(torch.nn.Linear, LoRALinear))
    if not targets:
        raise ValueError(f"{path}: target_modules {config['target_modules']!r} match no Linear layer of "
                         f"{type(model).__name__}")
    _check_tensors(model, path, targets, tensors, r, adapter_name)
    to_wrap = [name for name in targets if not isinstance(model.get_submodule(name), LoRALinear)]
    active = active_adapter(model) if to_wrap else None  # ValueError where the layers disagree

    # Checked: now change the model.
    hyper = {key: config[key] for key in ("r", "lora_alpha", "lora_dropout", "use_rslora")}
    if to_wrap:
        apply_lora(model, to_wrap, adapter_dtype=adapter_dtype, backend=backend, **hyper)
        for name in to_wrap:
            module = model.get_submodule(name)
            if adapter_name is not None:
                module.adapter_name = adapter_name
            module.active_adapter = module.adapter_name if active is None else active
    with torch.no_grad():
        for name in targets:
            module = model.get_submodule(name)
            adapter = module.adapter_name if adapter_name is None else adapter_name
            if adapter not in module.adapter_names:
                module.add_adapter(adapter, **hyper)  # trainable, as apply_lora's adapters
            module.set_adapter_config(adapter, hyper["lora_alpha"], hyper["lora_dropout"], hyper["use_rslora"])
            lora_A, lora_B, _, _ = module.adapter_operands(adapter)
            lora_A.copy_(tensors[f"{name}.lora_A"])
            lora_B.copy_(tensors[f"{name}.lora_B"])
    return model
