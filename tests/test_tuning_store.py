"""LORAKERNELS_TUNING_CACHE: tuning choices kept on disk and taken up by the next process.

Timing needs a GPU; here the base-GEMM strategies are "timed" by test_gemm_strategy's table of
made-up times, and the autotuner (which never runs under the interpreter) by a stand-in with
Triton's `configs` and `cache`. Would catch: a choice not written, a later process measuring again,
a stored choice taken where it is no longer a candidate (a config dropped from the kernel's list, a
strategy the pass cannot take, a file from elsewhere), a corrupt file breaking calls, and a store
written when the variable is not set.
"""

import json
import logging

import pytest
import torch
import triton

from lorakernels.ops import gemm_strategy, tuning_store
from lorakernels.plan import TUNING_CACHE_ENV, BaseGemm
from tests.test_gemm_strategy import _call, timings  # noqa: F401  (fixture)


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(TUNING_CACHE_ENV, str(tmp_path))
    tuning_store.forget_loaded()
    yield tmp_path
    tuning_store.forget_loaded()


def _new_process(monkeypatch):
    """What a new process starts with: no choice in memory, the files on disk."""
    monkeypatch.setattr(gemm_strategy, "_CHOSEN", {})
    tuning_store.forget_loaded()


def _stored_file(directory):
    (path,) = directory.glob("*.json")
    return path, json.loads(path.read_text())


def test_strategies_are_stored_and_taken_up_by_the_next_process(timings, store_dir, monkeypatch):
    times, measured, launched = timings
    times[BaseGemm.CUBLAS] = 0.5
    expected = _call(33)
    assert measured  # the first process measured ...
    path, stored = _stored_file(store_dir)
    assert sorted(stored["strategy"].values()) == ["cublas", "cublas"]  # ... and stored F2's and B2's choice
    assert path.name.startswith("cpu-torch")
    _new_process(monkeypatch)
    del measured[:]
    del launched[:]
    torch.manual_seed(0)
    actual = _call(33)
    assert measured == [] and set(gemm_strategy.chosen_strategies().values()) == {BaseGemm.CUBLAS}
    assert launched == [BaseGemm.CUBLAS, BaseGemm.CUBLAS]  # the stored strategy computed the call
    assert actual.shape == expected.shape


@pytest.mark.parametrize("stored", ["triton-tma", "no-such-strategy"])
def test_a_stored_strategy_the_pass_cannot_take_is_measured_again(timings, store_dir, monkeypatch, stored):
    """triton-tma: not a candidate on the CPU (no TMA there, as on an Ampere GPU reading a Hopper's file)."""
    times, measured, _ = timings
    _call(33)
    path, content = _stored_file(store_dir)
    content["strategy"] = {kind: stored for kind in content["strategy"]}
    path.write_text(json.dumps(content))
    _new_process(monkeypatch)
    del measured[:]
    _call(33)
    assert measured  # measured again, and the file now holds what was measured
    assert set(_stored_file(store_dir)[1]["strategy"].values()) == {"triton"}


def test_a_corrupt_file_is_ignored_with_a_warning_and_replaced(timings, store_dir, monkeypatch, caplog):
    _call(33)
    path, _ = _stored_file(store_dir)
    path.write_text("{not json")
    _new_process(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lorakernels"):
        _call(33)
    assert "ignored" in caplog.text
    assert len(_stored_file(store_dir)[1]["strategy"]) == 2


def test_nothing_is_written_without_the_variable(timings, tmp_path, monkeypatch):
    monkeypatch.delenv(TUNING_CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tuning_store.forget_loaded()
    _call(33)
    assert list(tmp_path.iterdir()) == []
    assert tuning_store._store(torch.device("cpu")) == (None, None) and tuning_store._STORES == {}


class _Tuner:
    """What the store reads of `triton.autotune`'s autotuner: its candidate configs and its cache
    {tuning key: chosen config}."""

    def __init__(self, configs):
        self.configs = configs
        self.cache = {}


def _configs(*blocks):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=3) for m in blocks]


def test_autotuner_choices_are_stored_and_prefill_the_next_process(store_dir):
    device = torch.device("cpu")
    first = _Tuner(_configs(64, 128))
    key = (4096, 4096, True, "torch.bfloat16", "torch.float32")
    first.cache[key] = first.configs[1]
    tuning_store.store_autotuner("F2/bucket4096/elem2/rpadNone", first, device)
    tuning_store.forget_loaded()
    later = _Tuner(_configs(64, 128))
    tuning_store.prefill_autotuner("F2/bucket4096/elem2/rpadNone", later, device)
    assert later.cache == {key: later.configs[1]}  # the next process's own candidate, not measured
    other_bucket = _Tuner(_configs(64, 128))
    tuning_store.prefill_autotuner("F2/bucket512/elem2/rpadNone", other_bucket, device)
    assert other_bucket.cache == {}
    changed = _Tuner(_configs(64, 256))  # the stored config is no longer a candidate
    tuning_store.prefill_autotuner("F2/bucket4096/elem2/rpadNone", changed, device)
    assert changed.cache == {}
