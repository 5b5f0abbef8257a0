"""PEFT's own tests judge `patch_peft`: the CI selection of tests/peft_suite/run.py (LoRA on MLPs
from PEFT's test_custom_models.py: forward, training, merging, saving and loading, adapter
switching) must pass patched wherever it passes unpatched, through the torch backend and, on a
subset, the Triton interpreter, with fused calls made. Runs in a subprocess (~30 s); PEFT's tests
come from the installed version's source distribution (pip download, cached) or
LORAKERNELS_PEFT_TESTS (a checkout or unpacked sdist). Without network outside CI it is skipped."""

import os
import signal
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
    # A session of its own, so that a timeout ends run.py's pytest processes too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"tests/peft_suite/run.py --selection ci did not finish in 600 s; logs in {tmp_path}")
    if proc.returncode == 3 and not os.environ.get("CI"):
        pytest.skip(f"PEFT's tests are not available here: {stderr.strip()}")
    assert proc.returncode == 0, stdout[-6000:] + stderr[-3000:]
    assert "| patched-torch |" in stdout and "| patched-interpreter |" in stdout
