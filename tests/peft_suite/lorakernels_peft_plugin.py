"""pytest plugin that `tests/peft_suite/run.py` loads into PEFT's own test suite (`-p`).

Environment (set by run.py):
- LORAKERNELS_PEFT_PATCH=1: after every adapter injection (`BaseTuner.inject_adapter`, which
  `get_peft_model`, `PeftModel.from_pretrained`, `add_adapter`, `load_adapter` and
  `inject_adapter_in_model` all go through) `lorakernels.patch_peft` patches the model's LoRA
  layers; otherwise PEFT runs as shipped.
- LORAKERNELS_PEFT_SELECT: a regular expression; tests whose node id does not match it are
  deselected.
- LORAKERNELS_PEFT_RESULTS: a JSON file to write: each test's outcome, and with the patch the
  number of fused calls and of fallbacks (by reason) made during the test.
- LORAKERNELS_PEFT_OFFLINE=1 (run.py sets HF_HUB_OFFLINE=1 with it): PEFT's `hub_online_once`
  helper, which switches the Hub back on for a model's first download, becomes a no-op, so a
  test that needs the Hub fails at once (alike in every run) instead of retrying for minutes.

Optional imports of PEFT's test helpers that none of the selected tests use (diffusers'
StableDiffusionPipeline, datasets' load_dataset) are stubbed when the package is missing, so
the suite runs without installing them; a selected test that did use one would fail in both
runs alike.
"""

import contextlib
import json
import os
import re
import sys
import types

_STUBS = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset", "Dataset", "DatasetDict")}
_RESULTS = {}
_CALLS = {}


def _stub_missing_modules():
    for name, attrs in _STUBS.items():
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            for attr in attrs:
                setattr(module, attr, None)
            sys.modules[name] = module


def _install_patch():
    import lorakernels
    from lorakernels import _peft_linear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    original_inject = BaseTuner.inject_adapter

    def inject_adapter(self, model, *args, **kwargs):
        result = original_inject(self, model, *args, **kwargs)
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            lorakernels.patch_peft(model)
        return result

    BaseTuner.inject_adapter = inject_adapter
    original_count = _peft_linear.count_call

    def count_call(layer, outcome):
        original_count(layer, outcome)
        _CALLS[outcome] = _CALLS.get(outcome, 0) + 1

    _peft_linear.count_call = count_call


@contextlib.contextmanager
def _stay_offline(model_id):
    yield


def _keep_hub_offline(rootpath):
    sys.path.insert(0, str(rootpath))
    import tests.testing_utils as peft_testing_utils

    peft_testing_utils.hub_online_once = _stay_offline


def pytest_configure(config):
    _stub_missing_modules()
    if os.environ.get("LORAKERNELS_PEFT_OFFLINE") == "1":
        _keep_hub_offline(config.rootpath)
    if os.environ.get("LORAKERNELS_PEFT_PATCH") == "1":
        _install_patch()


def pytest_collection_modifyitems(config, items):
    pattern = os.environ.get("LORAKERNELS_PEFT_SELECT")
    if not pattern:
        return
    regex = re.compile(pattern)
    keep = [item for item in items if regex.search(item.nodeid)]
    drop = [item for item in items if not regex.search(item.nodeid)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_setup(item):
    _CALLS.clear()


def _outcome(report):
    if report.failed:
        return "failed" if report.when == "call" else "error"
    if report.skipped:
        return "xfailed" if hasattr(report, "wasxfail") else "skipped"
    return "passed"


_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}


def pytest_runtest_logreport(report):
    """Record each test's worst phase outcome (a teardown error counts), and its calls."""
    entry = _RESULTS.setdefault(report.nodeid, {"outcome": "passed"})
    outcome = _outcome(report)
    if _RANK[outcome] > _RANK[entry["outcome"]]:
        entry["outcome"] = outcome
        if report.failed:
            entry["error"] = str(report.longrepr)[-3000:]
    if report.when == "teardown":
        entry["calls"] = dict(_CALLS)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LORAKERNELS_PEFT_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(_RESULTS, f, indent=1, sort_keys=True)
