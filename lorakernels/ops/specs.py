"""Kernel specs: one description per kernel, read by the launchers and by the build gate.

A spec names each runtime argument of its kernel, in the kernel's order, with its role:
a tensor (`Ptr`: which dtype it has, whether it may be absent), a size, a stride of one of
the tensors, a float scalar or a seed. It lists the feature constexprs with their domains,
the config function, and the dtype cases the launchers produce. From that one description:

- `KernelSpec.launch` builds the kernel's argument list from named values (strides are read
  off their tensors, an absent optional tensor gets a stand-in pointer that the kernel's
  flags compile out), checks the 16-byte alignment the fast configs assume, and picks the
  config: the interpreter's, the unaligned fallback, the one per padded rank, or the
  autotuner's choice per token bucket;
- the build gate (`lorakernels.build_gate`) enumerates the variants and derives their
  signatures (pointer dtypes from the roles, divisibility from the aligned arguments).

Adding a kernel argument touches the kernel and its spec; tests/test_specs.py fails when a
spec and its kernel disagree.
"""

import dataclasses
import enum
import itertools
from typing import Callable, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from lorakernels._interpreter import ensure_interpreter_fixes
from lorakernels.kernels.backward import b1_grad_dy_kernel, b2_grad_x_4bit_kernel, b2_grad_x_kernel, \
    b2_grad_x_tma_kernel, b3_adapter_grad_kernel, reduce_partials_kernel
from lorakernels.kernels.dropout import dropout_keep_mask_kernel
from lorakernels.kernels.forward import f1_dropout_down_kernel, f2_forward_gemm_4bit_kernel, f2_forward_gemm_kernel, \
    f2_forward_gemm_tma_kernel
from lorakernels.kernels.merge import merge_kernel
from lorakernels.operands import DenseWeight, FourBitWeight
from lorakernels.ops import configs, tuning_store
from lorakernels.plan import interpreter_hint, interpreting


class Role(enum.Enum):
    """The dtype of a tensor argument, by what it holds."""

    ACTIVATION = "activation"  # x's dtype (x, weight, bias, dy, y, dx)
    ADAPTER = "adapter"  # lora_A / lora_B's dtype: x's, or fp32
    FP32 = "fp32"  # U, V and reduction partials
    INT8 = "int8"
    UINT8 = "uint8"  # packed 4-bit codes
    INT32 = "int32"  # segment tables (several adapters in one batch)


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A tensor argument `<tensor>_ptr`; every tensor the fast configs get is 16-byte aligned."""

    name: str
    role: Role
    optional: bool = False

    @property
    def tensor(self):
        return self.name[:-len("_ptr")]


@dataclasses.dataclass(frozen=True)
class Desc:
    """A TMA tensor descriptor `<tensor>_desc` of a 2-D tensor (built on the host at each launch);
    its block shape is the config's constexprs named in `block` (rows, columns)."""

    name: str
    role: Role
    block: tuple

    @property
    def tensor(self):
        return self.name[:-len("_desc")]


@dataclasses.dataclass(frozen=True)
class Size:
    """An integer argument passed by name; `aligned`: divisible by 16 on the fast path."""

    name: str
    aligned: bool = False


@dataclasses.dataclass(frozen=True)
class Stride:
    """`tensor.stride(dim)` (0 for an absent optional tensor); `aligned` as for Size."""

    name: str
    tensor: str
    dim: int = 0
    aligned: bool = False


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A float argument (cast to fp32 inside the kernel)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Seed:
    """The dropout seed: an int, never specialized on (`do_not_specialize`), or a one-element int64
    tensor the kernel reads it from (`kernels.dropout.dropout_keep`; drawn on the device for CUDA graphs)."""

    name: str = "seed"


# (activation dtype, adapter dtype, dot input precision): the combinations the LoRA-linear
# launchers produce. The first four are the main cases (every config, every padded rank);
# fp16 adapters under fp16 have the tile sizes and rank-R math of bf16 with bf16 adapters, so
# the gate builds their first config and extreme ranks.
LAYER_CASES = (("bf16", "fp32", "ieee"),  # PEFT's default: bf16 model, fp32 adapters (fp32 rank-R math)
               ("bf16", "bf16", "ieee"),  # 16-bit adapters: 16-bit rank-R math, its own configs
               ("fp32", "fp32", "tf32"),  # fp32 with torch.backends.cuda.matmul.allow_tf32
               ("fp32", "fp32", "ieee"),  # fp32 without TF32
               ("fp16", "fp16", "ieee"))
DTYPES = ("fp32", "fp16", "bf16")
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def token_bucket(M):
    """The autotuning bucket of a launch with M rows (tokens): a power of two in [64, 16384]."""
    return min(max(configs.next_power_of_2(M), 64), 16384)


def _always(flags, r_pad):
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class KernelSpec:
    """Everything the launchers and the build gate need to know about one kernel.

    code: its name in the docs (F1, F2, B1, B2, B3, ...). args: its runtime arguments in order.
    flags: feature constexprs and their domains, the heaviest path first. configs(elem_bytes,
    r_pad): GPU candidates (several: autotuned). unaligned_config(elem_bytes): the fallback
    for operands that miss the alignment (GEMMs). valid_flags(flags, r_pad): which flag
    combinations a launcher can produce. gemm: its main loop is a full GEMM (tensor cores
    required). autotune_key: kernel arguments the autotuner keys on (with the token bucket
    and activation size). gate_cases/main_cases: the dtype cases the build gate builds, for
    `targets`. tma: it loads through TMA tensor descriptors (the gate asserts it does).
    """

    code: str
    kernel: object
    args: tuple
    flags: dict
    configs: Callable
    interpreter_config: dict
    unaligned_config: Optional[Callable] = None
    valid_flags: Callable = _always
    gemm: bool = False
    autotune_key: tuple = ()
    gate_cases: tuple = LAYER_CASES
    main_cases: int = 4
    targets: tuple = ("sm_90", "sm_80")
    tma: bool = False

    @property
    def name(self):
        return self.kernel.fn.__name__

    @property
    def case_constexprs(self):
        """The constexprs set per dtype case or rank, not enumerated as features."""
        return tuple(n for n in ("INPUT_PRECISION", "RANK_FP32", "RANK_PRECISION", "SPLIT_RANK", "R_PAD")
                     if n in self.kernel.arg_names)

    def flag_combinations(self, r_pad=None):
        """Every valid assignment of the feature flags, the heaviest first."""
        names = list(self.flags)
        combos = (dict(zip(names, values)) for values in itertools.product(*self.flags.values()))
        return [c for c in combos if self.valid_flags(c, r_pad)]

    def _device(self, arguments):
        """The launch's device, checked: compiled kernels take CUDA tensors (the interpreter, CPU
        tensors). The callers put every operand on one device (validated at the public boundary),
        so the first tensor tells."""
        first = arguments[0].base if isinstance(arguments[0], TensorDescriptor) else arguments[0]
        if not interpreting() and first.device.type != "cuda":
            raise ValueError(f"{self.code} ({self.name}) runs on CUDA tensors; got tensors on "
                             f"{first.device} ({interpreter_hint()})")
        return first.device

    def activation_bytes(self, values):
        """Element size of the activations (what the configs are chosen by); 4 without any."""
        for a in self.args:
            if isinstance(a, (Ptr, Desc)) and a.role is Role.ACTIVATION and values[a.tensor] is not None:
                return values[a.tensor].element_size()
        return 4

    @staticmethod
    def config_bytes(activation_bytes, constexprs):
        """The element size the configs are chosen by: that of the values the kernel computes
        with, 4 for fp32 rank-R products (RANK_FP32) whatever the activations' size."""
        return 4 if constexprs.get("RANK_FP32") else activation_bytes

    def aligned(self, arguments):
        """Whether the arguments meet the 16-byte alignment the fast configs were built for."""
        for a, value in zip(self.args, arguments):
            if isinstance(a, Ptr) and value.data_ptr() % 16:
                return False
            if isinstance(a, (Size, Stride)) and a.aligned and value % 16:
                return False
        return True

    def launch(self, grid, config=None, **values):
        """Launch over `grid(config)` with the named values; returns the config it ran with
        (None when the autotuner chose it, or when a bound launcher ran).

        values: each tensor by its name without `_ptr` (None for an absent optional one), each
        size, scalar and seed by its argument name, each feature flag and case constexpr.
        config: a config dict to run with instead of the spec's choice.

        The first launch of a variant (its constexprs, the Triton specialization of its arguments,
        its device and, for autotuned kernels, its token bucket and tuning key) goes through
        Triton's JIT (and the autotuner): that compiles it, and the compiled kernel is kept as a
        `BoundLaunch`. Every later launch of the variant fills the positional argument list
        (`_bind_arguments`, generated once per spec) and calls the compiled kernel's launcher
        directly: no name checks, no config choice, no JIT key, no autotuner dispatch.
        """
        try:
            arguments, key = self._bind_arguments(**values)
        except (TypeError, AttributeError):
            self._check_values(values)
            raise
        if config is None:
            bound = self._bound.get(key)
            if bound is not None:
                bound(grid, arguments)
                return None
        return self._launch_through_jit(grid, config, arguments, key, values)

    def _check_values(self, values):
        """The error for values the generated binder could not take: names missing or unknown, a
        required tensor absent. (Values it takes are what the launchers pass: no checks per launch.)"""
        expected = {a.tensor if isinstance(a, (Ptr, Desc)) else a.name for a in self.args
                    if not isinstance(a, Stride)}
        expected |= {*self.flags, *self.case_constexprs}
        if set(values) != expected:
            raise TypeError(f"{self.code} ({self.name}): missing {sorted(expected - set(values))}, "
                            f"unexpected {sorted(set(values) - expected)}")
        for a in self.args:
            if isinstance(a, (Ptr, Desc)) and values[a.tensor] is None and not getattr(a, "optional", False):
                raise ValueError(f"{self.code} ({self.name}): tensor {a.tensor!r} is required")

    def _launch_through_jit(self, grid, config, arguments, key, values):
        """A launch through Triton's JIT (or interpreter): checks, config choice, compilation on the
        first launch of a variant; the compiled kernel is then bound for the variant's next launches."""
        if interpreting():
            ensure_interpreter_fixes()  # bf16 would be garbage without them (lorakernels._interpreter)
        arguments = self._descriptors(arguments, values)
        device = self._device(arguments)
        constexprs = {n: values[n] for n in (*self.flags, *self.case_constexprs)}
        elem_bytes = self.config_bytes(self.activation_bytes(values), constexprs)
        r_pad = constexprs.get("R_PAD")
        chosen = config if config is not None else self.pick_config(arguments, elem_bytes, r_pad)
        if chosen == "autotune":
            tuner = self.autotuner(values["M"], elem_bytes, r_pad, device)
            compiled = tuner[grid](*arguments, **constexprs)
            meta = dict(tuner.best_config.kwargs)
            tuning_store.store_autotuner(self._tuner_id(values["M"], elem_bytes, r_pad), tuner, device)
        else:
            meta = {k: v for k, v in chosen.items() if k not in ("num_warps", "num_stages")}
            self._set_desc_blocks({**dict(zip((a.name for a in self.args), arguments)), **meta})
            compiled = self.kernel[grid(meta)](*arguments, **constexprs, **meta, num_warps=chosen["num_warps"],
                                               num_stages=chosen["num_stages"])
        if config is None and _bindable(compiled) and self.bindable:
            self._bound[key] = BoundLaunch(compiled, meta, [{**constexprs, **meta}[n] for n in self._constexpr_order])
        return None if chosen == "autotune" else chosen

    def _descriptors(self, arguments, values):
        """The arguments with a TMA descriptor for each `Desc` (its block shape set at launch)."""
        if not any(isinstance(a, Desc) for a in self.args):
            return arguments
        return [TensorDescriptor(values[a.tensor], list(values[a.tensor].shape), list(values[a.tensor].stride()),
                                 [1] * values[a.tensor].dim()) if isinstance(a, Desc) else value
                for a, value in zip(self.args, arguments)]

    def pick_config(self, arguments, elem_bytes, r_pad=None):
        """The config a launch with these arguments runs: a dict, or "autotune"."""
        if interpreting():
            return self.interpreter_config
        if self.unaligned_config is not None and not self.aligned(arguments):
            return self.unaligned_config(elem_bytes)
        candidates = self.configs(elem_bytes, r_pad)
        return candidates[0] if len(candidates) == 1 else "autotune"

    def fixed_config(self, elem_bytes, r_pad=None):
        """The config of a kernel with one candidate (the interpreter's under the interpreter),
        for launchers whose grid or buffers depend on it before the launch."""
        config = self._fixed.get((elem_bytes, r_pad))
        if config is None:
            if interpreting():
                config = self.interpreter_config
            else:
                (config,) = self.configs(elem_bytes, r_pad)
            self._fixed[(elem_bytes, r_pad)] = config
        return config

    def autotuner(self, M, elem_bytes, r_pad=None, device=None):
        """The autotuner for launches with M rows: one per (token bucket, activation size, rank),
        starting from the configs the tuning store holds for it on `device` (`ops.tuning_store`).

        The best tile for 512 tokens is not the best for 16k, and an autotune key can only name
        kernel arguments (M itself would retune at every new sequence length); the compiled
        binaries are shared between buckets, only the choice of config is per bucket.
        """
        key = (token_bucket(M), elem_bytes, r_pad)
        if key not in self._autotuners:
            hook = self._set_desc_blocks if any(isinstance(a, Desc) for a in self.args) else None
            candidates = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                        num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=hook)
                          for c in self.configs(elem_bytes, r_pad)]
            tuner = triton.autotune(configs=candidates, key=list(self.autotune_key))(self.kernel)
            tuning_store.prefill_autotuner(self._tuner_id(M, elem_bytes, r_pad), tuner, device)
            self._autotuners[key] = tuner
        return self._autotuners[key]

    def _tuner_id(self, M, elem_bytes, r_pad):
        """The name of an autotuner in the tuning store: the kernel and `autotuner`'s key."""
        return f"{self.code}/bucket{token_bucket(M)}/elem{elem_bytes}/rpad{r_pad}"

    def _set_desc_blocks(self, named):
        """Give every descriptor argument in `named` (arguments and config constexprs by name) the
        block shape of the config it runs with (the autotuner's pre-hook, or a direct launch)."""
        for a in self.args:
            if isinstance(a, Desc):
                named[a.name].block_shape = [named[b] for b in a.block]

    @property
    def bindable(self):
        """Whether compiled launches of this kernel are bound (`BoundLaunch`): not with TMA
        descriptors, which are built per launch."""
        return not any(isinstance(a, Desc) for a in self.args)

    def __post_init__(self):
        object.__setattr__(self, "_autotuners", {})
        object.__setattr__(self, "_bound", {})
        object.__setattr__(self, "_fixed", {})
        object.__setattr__(self, "_bind_arguments", _argument_binder(self))
        object.__setattr__(self, "_constexpr_order", tuple(self.kernel.arg_names[len(self.args):]))


def _bindable(compiled):
    """Whether a JIT launch returned a compiled kernel with a launcher of its own (not under the
    interpreter, which returns nothing)."""
    return compiled is not None and hasattr(compiled, "packed_metadata")


def _current_stream():
    """The current CUDA device's current stream, as Triton's JIT launches on it."""
    return driver.active.get_current_stream(driver.active.get_current_device())


class BoundLaunch:
    """One compiled variant of a kernel, launched without Triton's JIT: the grid's meta (its
    config's block sizes), the constexpr values the compiled launcher takes after the runtime
    arguments (Triton passes every bound argument positionally, constexprs included), and the
    compiled kernel's own launcher (`CompiledKernel.run`, the last step of `JITFunction.run`).
    """

    __slots__ = ("compiled", "meta", "constexprs", "run", "function", "packed_metadata")

    def __init__(self, compiled, meta, constexprs):
        self.compiled = compiled
        self.meta = meta
        self.constexprs = tuple(constexprs)
        self.run = compiled.run  # loads the module once
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata

    def __call__(self, grid, arguments):
        grid = grid(self.meta)
        stream = _current_stream()
        enter_hook = knobs.runtime.launch_enter_hook
        # Launch metadata only for a hook that reads it (a profiler): None, or (triton 3.7+) an empty chain.
        metadata = (self.compiled.launch_metadata(grid, stream, *arguments, *self.constexprs)
                    if enter_hook is not None and getattr(enter_hook, "calls", True) else None)
        self.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, self.function,
                 self.packed_metadata, metadata, enter_hook, knobs.runtime.launch_exit_hook, *arguments,
                 *self.constexprs)


_INT32_LIMIT = 2**31


def _device_key(tensor):
    """-1 for CPU tensors (the interpreter); for CUDA tensors their device and the current device,
    which Triton's JIT compiles and launches for."""
    index = tensor.get_device()
    return index if index < 0 else (index, torch.cuda.current_device())


def _argument_binder(spec):
    """A function generated from `spec`, straight-line: named values -> (the kernel's runtime
    arguments in order, the variant key).

    The arguments: each tensor (an absent optional one replaced by the first required tensor,
    which its flag compiles out), the strides read off their tensors, the sizes, the scalars as
    floats, the seed. The key holds everything that decides which compiled kernel a launch
    runs: the feature and case constexprs; each tensor's dtype and 16-byte alignment and each
    integer's divisibility by 16, equality to 1 and 32-bit range (Triton's specialization, so a
    bound kernel never runs arguments it was not compiled for); the device (`_device_key`); and for
    autotuned kernels the token bucket and the tuning key's values (the config the autotuner
    chose for them).
    """
    constexprs = (*spec.flags, *spec.case_constexprs)
    first_required = next(a.tensor for a in spec.args if isinstance(a, (Ptr, Desc)) and not getattr(a, "optional",
                                                                                                    False))
    optional = {a.tensor for a in spec.args if isinstance(a, Ptr) and a.optional}
    parameters = [a.tensor if isinstance(a, (Ptr, Desc)) else a.name for a in spec.args if not isinstance(a, Stride)]
    lines, key = [], [*constexprs, f"device_key({first_required})"]
    for i, a in enumerate(spec.args):
        local = f"a{i}"
        if isinstance(a, (Ptr, Desc)):
            value = f"({a.tensor} if {a.tensor} is not None else {first_required})" if a.tensor in optional \
                else a.tensor
            key += [f"{local}.dtype", f"{local}.data_ptr() % 16 == 0"]
        elif isinstance(a, Stride):
            value = f"{a.tensor}.stride({a.dim})"
            if a.tensor in optional:
                value = f"({value} if {a.tensor} is not None else 0)"
        elif isinstance(a, Scalar):
            value = f"float({a.name})"
        else:
            value = a.name
        lines.append(f"    {local} = {value}")
        if isinstance(a, (Size, Stride)):
            key += [f"{local} % 16 == 0", f"{local} == 1", f"{local} < {_INT32_LIMIT}"]
        elif isinstance(a, Seed):  # an int, or a one-element int64 tensor the kernel reads (a device seed)
            key.append(f"({local} < {_INT32_LIMIT} if {local}.__class__ is int else ({local}.dtype, {local}.device))")
    if spec.autotune_key:
        key += ["token_bucket(M)", *(n for n in spec.autotune_key if n not in constexprs)]
    name = f"bind_{spec.kernel.fn.__name__}"
    source = (f"def {name}(*, {', '.join([*parameters, *constexprs])}):\n" + "\n".join(lines) + "\n"
              f"    return [{', '.join(f'a{i}' for i in range(len(spec.args)))}], "
              f"({', '.join(key)},)\n")
    namespace = {"token_bucket": token_bucket, "device_key": _device_key}
    exec(compile(source, f"<lorakernels.ops.specs {name}>", "exec"), namespace)
    return namespace[name]


def _b1_valid(flags, r_pad):
    # B1 runs for V, for the dB partials (only up to FUSED_DB_MAX_RANK), or both.
    return (flags["COMPUTE_V"] or flags["COMPUTE_DB"]) and (
        not flags["COMPUTE_DB"] or r_pad is None or r_pad <= configs.FUSED_DB_MAX_RANK)


ACT, ADAPTER, FP32 = Role.ACTIVATION, Role.ADAPTER, Role.FP32
BOOL = (True, False)
# Several adapters in one batch (`operands.Segments`): the row-to-segment table, each segment's
# first rank column and its scaling; absent (compiled out) without SEGMENTED.
SEG, SEG_RANK_START, SEG_SCALE = (Ptr("seg_ptr", Role.INT32, optional=True),
                                  Ptr("seg_rank_start_ptr", Role.INT32, optional=True),
                                  Ptr("seg_scale_ptr", FP32, optional=True))

F1 = KernelSpec(
    "F1", f1_dropout_down_kernel,
    (Ptr("x_ptr", ACT), Ptr("a_ptr", ADAPTER), Ptr("u_ptr", FP32), SEG, SEG_RANK_START, Size("M"), Size("K", True),
     Size("R"), Stride("stride_xm", "x", aligned=True), Stride("stride_am", "a", aligned=True),
     Stride("stride_us", "u", 0), Stride("stride_um", "u", 1), Size("num_splits"), Seed(), Scalar("p")),
    {"HAS_DROPOUT": BOOL, "SEGMENTED": BOOL}, configs.f1_configs, configs.INTERPRETER_RANK_CONFIG)

F2 = KernelSpec(
    "F2", f2_forward_gemm_kernel,
    (Ptr("x_ptr", ACT), Ptr("w_ptr", ACT), Ptr("bias_ptr", ACT, optional=True), Ptr("u_ptr", FP32),
     Ptr("b_ptr", ADAPTER), SEG, SEG_RANK_START, SEG_SCALE, Ptr("y_ptr", ACT), Size("M"), Size("N", True),
     Size("K", True), Size("R"), Stride("stride_xm", "x", aligned=True), Stride("stride_wn", "w", aligned=True),
     Stride("stride_um", "u"), Stride("stride_bn", "b"), Stride("stride_ym", "y", aligned=True), Scalar("scaling")),
    {"HAS_BIAS": BOOL, "SEGMENTED": BOOL, "BASE_GEMM": BOOL}, configs.f2_configs, configs.INTERPRETER_GEMM_CONFIG,
    unaligned_config=configs.f2_unaligned_config, gemm=True, autotune_key=("N", "K", "BASE_GEMM"))

B1 = KernelSpec(
    "B1", b1_grad_dy_kernel,
    (Ptr("dy_ptr", ACT), Ptr("b_ptr", ADAPTER), Ptr("u_ptr", FP32, optional=True),
     Ptr("v_ptr", FP32, optional=True), Ptr("db_part_ptr", FP32, optional=True), SEG, SEG_RANK_START, SEG_SCALE,
     Size("M"), Size("N", True), Size("R"), Stride("stride_dym", "dy", aligned=True), Stride("stride_bn", "b"),
     Stride("stride_um", "u"), Stride("stride_vs", "v", 0), Stride("stride_vm", "v", 1), Size("num_splits"),
     Scalar("scaling")),
    {"COMPUTE_V": BOOL, "COMPUTE_DB": BOOL, "SEGMENTED": BOOL}, configs.b1_configs, configs.INTERPRETER_B1_CONFIG,
    valid_flags=_b1_valid)

B2 = KernelSpec(
    "B2", b2_grad_x_kernel,
    (Ptr("dy_ptr", ACT), Ptr("w_ptr", ACT), Ptr("v_ptr", FP32), Ptr("a_ptr", ADAPTER), SEG, SEG_RANK_START,
     SEG_SCALE, Ptr("dx_ptr", ACT), Size("M"), Size("N", True), Size("K", True), Size("R"),
     Stride("stride_dym", "dy", aligned=True), Stride("stride_wn", "w", aligned=True), Stride("stride_vm", "v"),
     Stride("stride_am", "a", aligned=True), Stride("stride_dxm", "dx", aligned=True), Seed(), Scalar("p")),
    {"BASE_GEMM": BOOL, "HAS_DROPOUT": BOOL, "SEGMENTED": BOOL}, configs.b2_configs, configs.INTERPRETER_GEMM_CONFIG,
    unaligned_config=configs.b2_unaligned_config, gemm=True, autotune_key=("N", "K", "BASE_GEMM"))

# F2 and B2 over a 4-bit base (QLoRA): the packed codes, their absmax and code table replace W.
F2_4BIT = KernelSpec(
    "F2-4bit", f2_forward_gemm_4bit_kernel,
    (Ptr("x_ptr", ACT), Ptr("codes_ptr", Role.UINT8), Ptr("absmax_ptr", FP32), Ptr("table_ptr", FP32),
     Ptr("bias_ptr", ACT, optional=True), Ptr("u_ptr", FP32), Ptr("b_ptr", ADAPTER), SEG, SEG_RANK_START, SEG_SCALE,
     Ptr("y_ptr", ACT), Size("M"), Size("N", True), Size("K", True), Size("R"), Stride("stride_xm", "x", aligned=True),
     Stride("stride_um", "u"), Stride("stride_bn", "b"), Stride("stride_ym", "y", aligned=True), Size("quant_shift"),
     Scalar("scaling")),
    {"HAS_BIAS": BOOL, "SEGMENTED": BOOL}, configs.f2_4bit_configs, configs.INTERPRETER_GEMM_CONFIG,
    unaligned_config=configs.f2_4bit_unaligned_config, gemm=True, autotune_key=("N", "K"))

B2_4BIT = KernelSpec(
    "B2-4bit", b2_grad_x_4bit_kernel,
    (Ptr("dy_ptr", ACT), Ptr("codes_ptr", Role.UINT8), Ptr("absmax_ptr", FP32), Ptr("table_ptr", FP32),
     Ptr("v_ptr", FP32), Ptr("a_ptr", ADAPTER), SEG, SEG_RANK_START, SEG_SCALE, Ptr("dx_ptr", ACT), Size("M"),
     Size("N", True), Size("K", True), Size("R"), Stride("stride_dym", "dy", aligned=True), Stride("stride_vm", "v"),
     Stride("stride_am", "a", aligned=True), Stride("stride_dxm", "dx", aligned=True), Size("quant_shift"), Seed(),
     Scalar("p")),
    {"HAS_DROPOUT": BOOL, "SEGMENTED": BOOL}, configs.b2_4bit_configs, configs.INTERPRETER_GEMM_CONFIG,
    unaligned_config=configs.b2_4bit_unaligned_config, gemm=True, autotune_key=("N", "K"))

# Hopper's F2 and B2: persistent programs, TMA descriptors for the streamed operands and the output.
TMA_CASES = tuple(case for case in LAYER_CASES if case[0] != "fp32")

F2_TMA = KernelSpec(
    "F2-TMA", f2_forward_gemm_tma_kernel,
    (Desc("x_desc", ACT, ("BLOCK_M", "BLOCK_K")), Desc("w_desc", ACT, ("BLOCK_N", "BLOCK_K")),
     Ptr("bias_ptr", ACT, optional=True), Ptr("u_ptr", FP32), Ptr("b_ptr", ADAPTER), SEG, SEG_RANK_START, SEG_SCALE,
     Desc("y_desc", ACT, ("BLOCK_M", "BLOCK_N")), Size("M"), Size("N", True), Size("K", True), Size("R"),
     Stride("stride_um", "u"), Stride("stride_bn", "b"), Scalar("scaling")),
    {"HAS_BIAS": BOOL, "SEGMENTED": BOOL}, configs.f2_tma_configs, configs.INTERPRETER_GEMM_CONFIG, gemm=True,
    autotune_key=("N", "K"), gate_cases=TMA_CASES, main_cases=2, targets=("sm_90",), tma=True)

B2_TMA = KernelSpec(
    "B2-TMA", b2_grad_x_tma_kernel,
    (Desc("dy_desc", ACT, ("BLOCK_M", "BLOCK_K")), Desc("w_desc", ACT, ("BLOCK_K", "BLOCK_N")), Ptr("v_ptr", FP32),
     Ptr("a_ptr", ADAPTER), SEG, SEG_RANK_START, SEG_SCALE, Desc("dx_desc", ACT, ("BLOCK_M", "BLOCK_N")), Size("M"),
     Size("N", True), Size("K", True), Size("R"), Stride("stride_vm", "v"), Stride("stride_am", "a", aligned=True),
     Seed(), Scalar("p")),
    {"HAS_DROPOUT": BOOL, "SEGMENTED": BOOL}, configs.b2_tma_configs, configs.INTERPRETER_GEMM_CONFIG, gemm=True,
    autotune_key=("N", "K"), gate_cases=TMA_CASES, main_cases=2, targets=("sm_90",), tma=True)

B3 = KernelSpec(
    "B3", b3_adapter_grad_kernel,
    (Ptr("x_ptr", ACT), Ptr("v_ptr", FP32), Ptr("part_ptr", FP32), SEG, SEG_RANK_START, SEG_SCALE, Size("M"),
     Size("K", True), Size("R"), Stride("stride_xm", "x", aligned=True), Stride("stride_vm", "v"),
     Size("rows_per_split"), Seed(), Scalar("p")),
    {"HAS_DROPOUT": BOOL, "SEGMENTED": BOOL}, configs.b3_configs, configs.INTERPRETER_RANK_CONFIG)

REDUCE = KernelSpec(
    "reduce", reduce_partials_kernel,
    (Ptr("part_ptr", FP32), Ptr("out_ptr", ADAPTER), Size("num_parts"), Size("numel", True), Size("cols"),
     Stride("stride_ot", "out", 1), Scalar("scaling")),
    {"TRANSPOSED": BOOL}, lambda elem_bytes, r_pad: [configs.REDUCE_CONFIG], configs.REDUCE_CONFIG,
    gate_cases=tuple(("fp32", d, "ieee") for d in DTYPES))

MERGE = KernelSpec(
    "merge", merge_kernel,
    (Ptr("w_ptr", ACT), Ptr("b_ptr", ADAPTER), Ptr("a_ptr", ADAPTER), Ptr("out_ptr", ACT), Size("N"),
     Size("K", True), Size("R"), Stride("stride_wn", "w", aligned=True), Stride("stride_bn", "b"),
     Stride("stride_ar", "a"), Stride("stride_on", "out", aligned=True), Scalar("scaling")),
    {"SUBTRACT": BOOL}, lambda elem_bytes, r_pad: [configs.MERGE_CONFIG], configs.INTERPRETER_MERGE_CONFIG,
    gate_cases=tuple((d, a, "ieee") for d in DTYPES for a in sorted({d, "fp32"})))

DROPOUT_MASK = KernelSpec(
    "mask", dropout_keep_mask_kernel,
    (Ptr("out_ptr", Role.INT8), Size("M"), Size("K", True), Stride("stride_om", "out", aligned=True), Seed(),
     Scalar("p")),
    {}, lambda elem_bytes, r_pad: [configs.DROPOUT_MASK_CONFIG], configs.DROPOUT_MASK_CONFIG,
    gate_cases=(("fp32", "fp32", "ieee"),))

# The GEMM-core kernels of F2 and B2 by the kind of base weight they read (`operands`: a
# description's `kind`), and Hopper's TMA kernels over a dense W.
GEMM_CORES = {"F2": {DenseWeight.kind: F2, FourBitWeight.kind: F2_4BIT, "tma": F2_TMA},
              "B2": {DenseWeight.kind: B2, FourBitWeight.kind: B2_4BIT, "tma": B2_TMA}}

ALL = (F1, F2, F2_TMA, F2_4BIT, B1, B2, B2_TMA, B2_4BIT, B3, REDUCE, MERGE, DROPOUT_MASK)
