"""What the kernels are is decided at import: TRITON_INTERPRET=1 set later, or a CPU launch of the
compiled kernels, must give a clear error (or a working fallback), never `0 active drivers`."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A fresh process that imports lorakernels WITHOUT the interpreter, then sets TRITON_INTERPRET=1.
_LATE_INTERPRET_SCRIPT = """
import os
import torch
import lorakernels
from lorakernels import lora_linear, ops
from lorakernels.testing import make_inputs

os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were built for GPUs at import
x, weight, bias, lora_A, lora_B = make_inputs(8, 16, 12, 4, torch.float32)
y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5)  # auto: the torch backend on CPU
assert y.shape == (8, 12)
for call in (lambda: lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend="triton"),
             lambda: ops.dropout_keep_mask(1, 4, 8, 0.5, "cpu")):
    try:
        call()
    except ValueError as error:
        print("ValueError:", error)
    else:
        print("no error")
"""


def test_interpreter_requested_after_import_is_explained():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAKERNELS_") and k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _LATE_INTERPRET_SCRIPT], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    late = "TRITON_INTERPRET=1 is set now, but was not when lorakernels was imported"
    assert lines[0].startswith("ValueError: backend 'triton' needs CUDA tensors") and late in lines[0]
    assert lines[1].startswith("ValueError: mask (dropout_keep_mask_kernel) runs on CUDA tensors; got tensors on cpu")
    assert late in lines[1]
