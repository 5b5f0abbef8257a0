"""Tuning choices kept across processes, when asked for: LORAKERNELS_TUNING_CACHE=<directory>.

Two choices are measured on a GPU the first time a process needs them: the autotuner's config of
each autotuned kernel (per token bucket, activation size, rank and tuning key; compiling and timing
every candidate costs seconds per kernel variant) and `base_gemm="auto"`'s strategy per kind of
GEMM pass (`ops.gemm_strategy`, ~10 ms per candidate). With the variable set, every choice a
process makes is written to a JSON file in that directory, one file per device model and software
(GPU name and compute capability, torch, triton, lorakernels), and the next process on that setup
starts with them: no kernel is autotuned and no strategy timed again.

A stored choice is only ever a choice among valid ones: a config is taken only if it is one of the
kernel's current candidates, a strategy only if the pass can take it (`gemm_strategy` checks), so a
stale file costs speed at worst, never correctness. Writes replace the file atomically (a crash or
two processes at once leave one whole file); a file that cannot be read or parsed is ignored
(and replaced by the next write) with a warning on the "lorakernels" logger.
"""

import json
import logging
import os
import re
import tempfile

import torch

from lorakernels.plan import tuning_cache_dir

logger = logging.getLogger("lorakernels")

_STORES = {}  # file path -> {"autotune": {tuner id: [[tuning key, config], ...]}, "strategy": {kind: value}}


def _setup_name(device):
    """The file name of the choices made on `device` with this software."""
    import triton

    import lorakernels

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        hardware = device.type
    name = f"{hardware}-torch{torch.__version__}-triton{triton.__version__}-lorakernels{lorakernels.__version__}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", name) + ".json"


def _store(device):
    """(path, the loaded choices) for `device`, or (None, None) when no directory is set (or no
    device is named)."""
    directory = tuning_cache_dir()
    if directory is None or device is None:
        return None, None
    path = os.path.join(directory, _setup_name(device))
    store = _STORES.get(path)
    if store is None:
        store = {"autotune": {}, "strategy": {}}
        try:
            with open(path) as f:
                loaded = json.load(f)
            store = {"autotune": dict(loaded["autotune"]), "strategy": dict(loaded["strategy"])}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("tuning cache %s ignored (%s: %s); it is rewritten by the next choice",
                           path, type(exc).__name__, exc)
        _STORES[path] = store
    return path, store


def _write(path, store):
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(store, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("tuning cache %s not written (%s)", path, exc)


def stored_strategy(kind, device):
    """The strategy value ('triton', 'cublas', ...) stored for `kind` of GEMM pass, or None."""
    _, store = _store(device)
    return None if store is None else store["strategy"].get(repr(kind))


def store_strategy(kind, device, value):
    path, store = _store(device)
    if store is not None and store["strategy"].get(repr(kind)) != value:
        store["strategy"][repr(kind)] = value
        _write(path, store)


def _config_dict(config):
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def prefill_autotuner(tuner_id, tuner, device):
    """Give a new autotuner (`triton.autotune`'s) the configs stored for its tuning keys, where each
    is still one of its candidates. tuner_id: a string naming the kernel and the autotuner's bucket."""
    _, store = _store(device)
    if store is None:
        return
    for key, config in store["autotune"].get(tuner_id, []):
        match = next((c for c in tuner.configs if _config_dict(c) == config), None)
        if match is not None:
            tuner.cache[tuple(key)] = match


def store_autotuner(tuner_id, tuner, device):
    """Store the configs the autotuner has chosen (its `cache`) that are not stored yet."""
    path, store = _store(device)
    if store is None:
        return
    entries = store["autotune"].setdefault(tuner_id, [])
    known = {json.dumps(key) for key, _ in entries}
    added = False
    for key, config in tuner.cache.items():
        try:
            text = json.dumps(list(key))
        except TypeError:  # a tuning key that JSON cannot hold: that choice is not kept
            continue
        if text not in known:
            entries.append([list(key), _config_dict(config)])
            known.add(text)
            added = True
    if added:
        _write(path, store)


def forget_loaded():
    """Drop the choices read into this process (the files stay): the next use reads them again."""
    _STORES.clear()
