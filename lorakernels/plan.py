"""The launch plan: every dispatch decision, resolved once at the public boundary.

`resolve_plan` is the only reader of the environment in the package (LORAKERNELS_BACKEND,
LORAKERNELS_BASE_GEMM; TRITON_INTERPRET is read once, at import, when the kernels are decorated:
`interpreting()`; LORAKERNELS_TUNING_CACHE by `tuning_cache_dir`, for `ops.tuning_store`) and
of torch's TF32 switch. What it returns is typed
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
TUNING_CACHE_ENV = "LORAKERNELS_TUNING_CACHE"


class Backend(enum.Enum):
    """Who computes the fused LoRA linear: the Triton kernels, or whole-tensor torch ops."""

    TRITON = "triton"
    TORCH = "torch"


class BaseGemm(enum.Enum):
    """Who runs the frozen GEMMs X W^T and dY W on the Triton backend.

    TRITON: the fused kernels (F2, B2) run them with the LoRA term in the same accumulator.
    TRITON_TMA: the same fused GEMMs as Hopper kernels: persistent programs, TMA tensor
    descriptors (sm_90 and newer; elsewhere, for fp32 activations and for operands TMA cannot
    address, the TRITON kernels run).
    CUBLAS: the kernels write only the LoRA term (and bias), then `torch.addmm` adds the GEMM
    in cuBLAS's epilogue (DESIGN's second strategy).
    AUTO (the default): per kind of GEMM pass (forward or dX, token bucket, shapes, dtypes,
    flags), the fastest of the above as measured on its first call on a GPU
    (`lorakernels.ops.gemm_strategy`); TRITON where nothing can be measured (the interpreter).
    A 4-bit base always runs its fused 4-bit kernels.
    """

    TRITON = "triton"
    TRITON_TMA = "triton-tma"
    CUBLAS = "cublas"
    AUTO = "auto"


def _interpret_requested():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# `triton.jit` reads TRITON_INTERPRET when a kernel is defined, that is when lorakernels is
# imported (this module is imported before the kernels): the kernels are interpreted, or
# compiled for GPUs, for the life of the process, whatever the variable says later.
_KERNELS_INTERPRETED = _interpret_requested()


def interpreting():
    """True when the Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET=1
    was set when lorakernels was imported."""
    return _KERNELS_INTERPRETED


def interpreter_hint():
    """What to do about a CPU launch of compiled kernels, for error messages."""
    if _interpret_requested() and not _KERNELS_INTERPRETED:
        return ("TRITON_INTERPRET=1 is set now, but was not when lorakernels was imported, so its kernels were "
                "built for GPUs: set it before the import (or use the torch backend, the default on CPU)")
    return "set TRITON_INTERPRET=1 before lorakernels is imported to run the kernels on CPU tensors"


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How one call runs: backend, base-GEMM strategy, and the precision of fp32 dots.

    tf32: fp32 operands use TF32 tensor-core dots (as torch.matmul does when
    `torch.backends.cuda.matmul.allow_tf32` is set); False means full-precision fp32 dots.
    """

    backend: Backend
    base_gemm: BaseGemm = BaseGemm.AUTO
    tf32: bool = False

    @property
    def tma(self):
        """True when the fused GEMMs take the Hopper TMA-persistent kernels where operands allow."""
        return self.base_gemm is BaseGemm.TRITON_TMA

    def input_precision(self, dtype):
        """`tl.dot`'s input_precision for operands of `dtype`."""
        return "tf32" if self.tf32 and dtype == torch.float32 else "ieee"

    def low_rank(self, activation_dtype, adapter_dtype):
        """The RANK_FP32 / RANK_PRECISION constexprs of the rank-R kernels (F1, B1, B3; see `low_rank_math`)."""
        rank_fp32, rank_precision = low_rank_math(activation_dtype == torch.float32, adapter_dtype == torch.float32,
                                                  self.input_precision(activation_dtype))
        return {"RANK_FP32": rank_fp32, "RANK_PRECISION": rank_precision}

    @staticmethod
    def split_rank(activation_dtype, adapter_dtype):
        """The SPLIT_RANK constexpr of the fused GEMMs (F2, B2; see `split_rank_term`)."""
        return {"SPLIT_RANK": split_rank_term(activation_dtype == torch.float32, adapter_dtype == torch.float32)}

    def to_op_args(self):
        """(backend, base_gemm, tf32) as plain values, for a torch.library custom op's schema."""
        return self.backend.value, self.base_gemm.value, self.tf32

    @classmethod
    def from_op_args(cls, backend, base_gemm, tf32):
        """The inverse of `to_op_args`."""
        return cls(Backend(backend), BaseGemm(base_gemm), bool(tf32))


def low_rank_math(activations_fp32, adapters_fp32, input_precision):
    """(fp32 operands?, `tl.dot` input_precision) of the rank-R products (F1: U, B1: V and dB, B3:
    dA): the adapters' precision, with the arithmetic torch.matmul gives them in PEFT.

    | activations | adapters | rank-R products (F1, B1, B3)  | rank-R term in F2, B2          |
    | fp32        | fp32     | fp32, `input_precision`       | fp32, `input_precision`        |
    | bf16/fp16   | fp32     | fp32, "ieee" (FMA)            | two-part bf16 (`split_rank_term`) |
    | bf16/fp16   | same     | 16-bit on tensor cores        | 16-bit on tensor cores         |

    fp32 activations: the main GEMM's `input_precision`, full fp32 ("ieee") unless
    torch.backends.cuda.matmul.allow_tf32 asks torch.matmul for TF32, where it is "tf32".

    fp32 adapters under 16-bit activations (PEFT's default; PEFT runs them in fp32 outside
    autocast, on cuBLAS's fp32 GEMM with TF32 off by default): fp32 operands (the 16-bit tile
    converted in registers, exactly) and "ieee" dots, one rounded FMA per product on the FMA units:
    the arithmetic of cuBLAS's fp32 GEMM, so U, V, dA and dB are as accurate as PEFT's. 3xTF32
    ("tf32x3") was used before: it keeps 22 bits of each fp32 operand and the tensor cores
    accumulate with truncation, and on the H200 dB came out 1.6-3.6x PEFT's error (the same
    under the GPU model of tests/gpu_dots.py). The cost: these products are r/K of the main GEMM's
    work but run on the FMA units (67 TFLOP/s on an H200, against ~990 for bf16 tensor cores): at
    r = 16, F1's 2r FLOP per 2-byte element of x (16 FLOP/byte) is near the FMA units' ridge
    (~14 FLOP/byte at 4.8 TB/s), so about memory-bound, and about r/16 times its memory time
    above. Not yet measured on a GPU; Triton's "bf16x6" (three bf16 parts, six tensor-core
    products) is the candidate to measure against it, for both speed and accuracy.

    16-bit adapters: the activations' 16-bit dtype, fp32 accumulation.
    """
    if activations_fp32:
        return True, input_precision
    return adapters_fp32, "ieee"


def split_rank_term(activations_fp32, adapters_fp32):
    """Whether F2 and B2 split the rank-R term's fp32 operands into two bf16 parts: with fp32
    adapters under 16-bit activations, where the term must keep the adapters' precision but the
    GEMM's registers leave no room for fp32 tiles (see `tiles.split_dot`). The parts keep 16 bits of
    each operand (relative error ~2^-16), far below the rounding of the 16-bit output (2^-9 for
    bf16, 2^-11 for fp16), so y and dX lose nothing against fp32 products."""
    return adapters_fp32 and not activations_fp32


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
                         f"before lorakernels is imported; got tensors on {device} ({interpreter_hint()})")
    return backend


def check_options(backend=None, base_gemm=None):
    """ValueError now for a backend or base GEMM strategy that no call could resolve (None: the
    environment's, checked when a call resolves it)."""
    if backend is not None and backend != "auto":
        _choice(Backend, backend, BACKEND_ENV, "auto", "backend", extra=("auto",))
    if base_gemm is not None:
        resolve_base_gemm(base_gemm)


def resolve_base_gemm(requested=None):
    """The BaseGemm from an argument ('auto', 'triton', 'triton-tma', 'cublas' or a member), else
    LORAKERNELS_BASE_GEMM, else AUTO."""
    return _choice(BaseGemm, requested, BASE_GEMM_ENV, BaseGemm.AUTO.value, "base GEMM strategy")


def has_tma(device):
    """Whether the kernels may use TMA on `device`: a CUDA device of compute capability 9.0 or
    newer, or the interpreter (which runs tensor descriptors on CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return interpreting()


def tuning_cache_dir():
    """The directory where tuning choices are kept across processes (LORAKERNELS_TUNING_CACHE;
    None, the default: each process measures its own; see `ops.tuning_store`)."""
    return os.environ.get(TUNING_CACHE_ENV) or None


_RESOLVED = {}  # (device, backend, base GEMM (arguments, else the environment), tf32, interpreter) -> plan


def resolve_plan(device, backend=None, base_gemm=None):
    """The LaunchPlan for a call on tensors on `device`; None arguments follow the environment.

    TRITON_TMA on a device without TMA (Ampere) resolves to TRITON: the same fused GEMMs with
    pointer loads. Resolved once per (device, arguments, environment values, TF32 switch): a
    call reads the environment and the switch, and looks the plan up."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "auto")
    if base_gemm is None:
        base_gemm = os.environ.get(BASE_GEMM_ENV, BaseGemm.AUTO.value)
    key = (device, backend, base_gemm, tf32, _KERNELS_INTERPRETED)
    try:
        plan = _RESOLVED.get(key)
    except TypeError:  # an unhashable argument: not a valid choice, refused with the message of `_choice`
        return _resolve_plan(device, backend, base_gemm, tf32)
    if plan is None:
        plan = _RESOLVED[key] = _resolve_plan(device, backend, base_gemm, tf32)
    return plan


def _resolve_plan(device, backend, base_gemm, tf32):
    chosen_backend = resolve_backend(backend, device)
    strategy = resolve_base_gemm(base_gemm)
    if strategy is BaseGemm.TRITON_TMA and not has_tma(device):
        strategy = BaseGemm.TRITON
    return LaunchPlan(chosen_backend, strategy, tf32)
