"""The launch plan: every dispatch decision, resolved once at the public boundary.

`resolve_plan` is the only reader of the environment in the package (LORAKERNELS_BACKEND,
LORAKERNELS_BASE_GEMM, and TRITON_INTERPRET through `interpreting()`, the one place that reads
it) and of torch's TF32 switch. What it returns is typed
(enums and booleans) and travels unchanged down to the launchers; no layer below it looks at a
string or an environment variable again. At the custom-op boundary (torch.library ops take
only plain values) the plan crosses as `to_op_args()` and comes back as `LaunchPlan.from_op_args`.
"""

import dataclasses
import enum
import os

import torch

BACKEND_ENV = "LORAKERNELS_BACKEND"
BASE_GEMM_ENV = "LORAKERNELS_BASE_GEMM"


class Backend(enum.Enum):
    """Who computes the fused LoRA linear: the Triton kernels, or whole-tensor torch ops."""

    TRITON = "triton"
    TORCH = "torch"


class BaseGemm(enum.Enum):
    """Who runs the frozen GEMMs X W^T and dY W on the Triton backend.

    TRITON: the fused kernels (F2, B2) run them with the LoRA term in the same accumulator.
    CUBLAS: the kernels write only the LoRA term (and bias), then `torch.addmm` adds the GEMM
    in cuBLAS's epilogue (DESIGN's second strategy).
    """

    TRITON = "triton"
    CUBLAS = "cublas"


def interpreting():
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How one call runs: backend, base-GEMM strategy, and the precision of fp32 dots.

    tf32: fp32 operands use TF32 tensor-core dots (as torch.matmul does when
    `torch.backends.cuda.matmul.allow_tf32` is set); False means full-precision fp32 dots.
    """

    backend: Backend
    base_gemm: BaseGemm = BaseGemm.TRITON
    tf32: bool = False

    @property
    def fused_base_gemm(self):
        """True when the Triton kernels run the frozen GEMM themselves."""
        return self.base_gemm is BaseGemm.TRITON

    def input_precision(self, dtype):
        """`tl.dot`'s input_precision for operands of `dtype`."""
        return "tf32" if self.tf32 and dtype == torch.float32 else "ieee"

    def to_op_args(self):
        """(backend, base_gemm, tf32) as plain values, for a torch.library custom op's schema."""
        return self.backend.value, self.base_gemm.value, self.tf32

    @classmethod
    def from_op_args(cls, backend, base_gemm, tf32):
        """The inverse of `to_op_args`."""
        return cls(Backend(backend), BaseGemm(base_gemm), bool(tf32))


def _choice(enum_type, requested, env_name, default, label, extra=()):
    """An enum member from an argument (member or its string value), else the environment, else default."""
    if isinstance(requested, enum_type):
        return requested
    value = requested if requested is not None else os.environ.get(env_name, default)
    try:
        return enum_type(value)
    except ValueError:
        choices = (*extra, *(m.value for m in enum_type))
        raise ValueError(f"{label} must be one of {choices} (argument or env {env_name}); got {value!r}") from None


def resolve_backend(requested, device):
    """The Backend for tensors on `device`.

    `requested` (or LORAKERNELS_BACKEND when it is None) is 'auto' (Triton on CUDA, and on CPU
    under TRITON_INTERPRET=1; torch otherwise), 'triton', 'torch', or a Backend member.
    """
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if requested is None:
        requested = os.environ.get(BACKEND_ENV, "auto")
    if requested == "auto":
        return Backend.TRITON if triton_runs_here else Backend.TORCH
    backend = _choice(Backend, requested, BACKEND_ENV, "auto", "backend", extra=("auto",))
    if backend is Backend.TRITON and not triton_runs_here:
        raise ValueError(f"backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                         f"before lorakernels is imported; got tensors on {device}")
    return backend


def resolve_base_gemm(requested=None):
    """The BaseGemm from an argument ('triton', 'cublas' or a member), else LORAKERNELS_BASE_GEMM, else TRITON."""
    return _choice(BaseGemm, requested, BASE_GEMM_ENV, BaseGemm.TRITON.value, "base GEMM strategy")


def resolve_plan(device, backend=None, base_gemm=None):
    """The LaunchPlan for a call on tensors on `device`; None arguments follow the environment."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return LaunchPlan(resolve_backend(backend, device), resolve_base_gemm(base_gemm), tf32)
