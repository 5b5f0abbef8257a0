"""The interpreter fixes (lorakernels._interpreter): installed by `import lorakernels`, exactly where needed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakernels._interpreter import _numpy_rejects_array_to_int
from tests.utils import DEVICE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the fix concerns the interpreter only")
def test_interpreter_index_fix_is_installed_where_numpy_needs_it():
    from triton.runtime import interpreter

    installed = getattr(interpreter._patch_lang_tensor, "_lorakernels_index_patch", False)
    assert installed == _numpy_rejects_array_to_int()


# A fresh process that only sets TRITON_INTERPRET=1 and imports lorakernels (no test setup, no
# helper that patches anything): bf16 through the Triton kernels must obey the suite's error rule.
# Without the automatic bf16 fix the interpreter's bf16 tl.dot returns garbage and this fails.
_BF16_SCRIPT = """
import torch
import lorakernels
from lorakernels.testing import assert_close_to_reference, make_inputs, reference_grads

torch.manual_seed(0)
x, weight, bias, lora_A, lora_B = make_inputs(37, 45, 53, 8, torch.bfloat16)
leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)]
y = lorakernels.lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], 0.75, backend="triton")
dy = torch.randn_like(y)
y.backward(dy)
y64, grads64 = reference_grads(x, weight, bias, lora_A, lora_B, 0.75, None, 0.0, dy.double(), upcast=True)
y_lp, grads_lp = reference_grads(x, weight, bias, lora_A, lora_B, 0.75, None, 0.0, dy, upcast=False)
for name, actual, exp64, lowp in zip(("y", "dx", "dA", "dB"), [y.detach()] + [t.grad for t in leaves],
                                     [y64] + grads64, [y_lp] + grads_lp):
    assert_close_to_reference(name, actual, exp64, lowp, torch.bfloat16)
print("bf16 ok")
"""


def test_import_alone_makes_interpreted_bf16_correct():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAKERNELS_")}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _BF16_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "bf16 ok" in result.stdout, result.stderr[-3000:]
