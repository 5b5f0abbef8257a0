"""PEFT's own tests judge `patch_peft`: the CI selection of tests/peft_suite/run.py (LoRA on MLPs
from PEFT's test_custom_models.py: forward, training, merging, saving and loading, adapter
switching) must pass patched wherever it passes unpatched, through the torch backend and, on a
subset, the Triton interpreter, with fused calls made. Runs in a subprocess (~30 s); PEFT's tests
come from the installed version's source distribution (pip download, cached) or
LORAKERNELS_PEFT_TESTS (a checkout or unpacked sdist). Without network outside CI it is skipped."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

RUN = Path(__file__).resolve().parent / "peft_suite" / "run.py"


def test_peft_suite_ci_selection_passes_patched(tmp_path):
    cmd = [sys.executable, str(RUN), "--selection", "ci", "--output-dir", str(tmp_path)]
    if os.environ.get("LORAKERNELS_PEFT_TESTS"):
        cmd += ["--peft-tests", os.environ["LORAKERNELS_PEFT_TESTS"]]
    env = {k: v for k, v in os.environ.items() if k != "LORAKERNELS_TEST_DEVICE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode == 3 and not os.environ.get("CI"):
        pytest.skip(f"PEFT's tests are not available here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "| patched-torch |" in proc.stdout and "| patched-interpreter |" in proc.stdout
