"""Every kernel variant the launchers can choose on a GPU, for the ahead-of-time build gate.

A variant is one kernel with concrete argument types, constexprs and launch options. The
block configs come from `lorakernels.ops.configs` (the same functions the launchers call
with the interpreter off); the feature constexprs are enumerated over their domains. The
argument types follow what the launchers pass (activations in x's dtype, U/V/partials in
fp32, adapters in x's dtype or fp32) and the JIT's specialization for the usual aligned
case: pointers, and the sizes and row strides that equal K or N, divisible by 16.
"""

import dataclasses
import itertools

from lorakernels.kernels.dropout import dropout_keep_mask_kernel
from lorakernels.kernels.lora_backward import (
    lora_adapter_grad_kernel,
    lora_grad_dy_kernel,
    lora_grad_x_kernel,
    reduce_partials_kernel,
)
from lorakernels.kernels.lora_forward import lora_down_kernel, lora_linear_fwd_kernel
from lorakernels.kernels.lora_merge import lora_merge_kernel
from lorakernels.ops import configs

DTYPES = ("fp32", "fp16", "bf16")
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# The kernels whose main loop is a full GEMM: their sm_90 builds must use wgmma.
GEMM_KERNELS = ("lora_linear_fwd_kernel", "lora_grad_x_kernel")

# Per kernel: pointer arguments holding activations (x's dtype), adapters, or fp32 buffers,
# and the integer arguments divisible by 16 in the aligned case (sizes/strides equal to K or N).
_ARGS = {
    "lora_down_kernel": dict(act=("x_ptr",), adapter=("a_ptr",), fp32=("u_ptr",),
                             aligned=("K", "stride_xm", "stride_am"), floats=("p",)),
    "lora_linear_fwd_kernel": dict(act=("x_ptr", "w_ptr", "bias_ptr", "y_ptr"), adapter=("b_ptr",), fp32=("u_ptr",),
                                   aligned=("N", "K", "stride_xm", "stride_wn", "stride_ym"), floats=("scaling",)),
    "lora_grad_dy_kernel": dict(act=("dy_ptr",), adapter=("b_ptr",), fp32=("u_ptr", "v_ptr", "db_part_ptr"),
                                aligned=("N", "stride_dym"), floats=("scaling",)),
    "lora_grad_x_kernel": dict(act=("dy_ptr", "w_ptr", "dx_ptr"), adapter=("a_ptr",), fp32=("v_ptr",),
                               aligned=("N", "K", "stride_dym", "stride_wn", "stride_am", "stride_dxm"),
                               floats=("p",)),
    "lora_adapter_grad_kernel": dict(act=("x_ptr",), adapter=(), fp32=("v_ptr", "part_ptr"),
                               aligned=("K", "stride_xm"), floats=("p",)),
    "reduce_partials_kernel": dict(act=(), adapter=("out_ptr",), fp32=("part_ptr",), aligned=("numel",),
                                   floats=("scaling",)),
    "lora_merge_kernel": dict(act=("w_ptr", "out_ptr"), adapter=("b_ptr", "a_ptr"), fp32=(),
                              aligned=("K", "stride_wn", "stride_on"), floats=("scaling",)),
    "dropout_keep_mask_kernel": dict(act=(), adapter=(), fp32=(), aligned=("K", "stride_om"), floats=("p",),
                                     int8=("out_ptr",)),
}


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    kernel: object
    dtype: str           # activation dtype
    adapter_dtype: str
    constexprs: tuple    # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    aligned: bool = True

    @property
    def name(self):
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__

    def signature(self):
        """(signature, constexprs, attrs) for triton.compiler.ASTSource."""
        spec = _ARGS[self.name]
        consts = dict(self.constexprs)
        sig, attrs = {}, {}
        for i, arg in enumerate(self.kernel.arg_names):
            if arg in consts:
                sig[arg] = "constexpr"
                continue
            if arg in spec["act"]:
                sig[arg] = "*" + self.dtype
            elif arg in spec["adapter"]:
                sig[arg] = "*" + self.adapter_dtype
            elif arg in spec["fp32"]:
                sig[arg] = "*fp32"
            elif arg in spec.get("int8", ()):
                sig[arg] = "*i8"
            elif arg in spec["floats"]:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
            if self.aligned and (sig[arg].startswith("*") or arg in spec["aligned"]):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, consts, attrs

    def describe(self):
        c = dict(self.constexprs)
        blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK") if k in c)
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs
                         if not k.startswith("BLOCK") and k not in ("GROUP_M",))
        return (f"{self.name} {self.dtype}/{self.adapter_dtype} {blocks} w{self.num_warps}s{self.num_stages} "
                f"{flags}{'' if self.aligned else ' unaligned'}")


def _variant(kernel, dtype, adapter_dtype, config, aligned=True, **flags):
    config = dict(config)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    return KernelVariant(kernel, dtype, adapter_dtype, tuple(sorted({**config, **flags}.items())), warps, stages,
                         aligned)


def _gemm_config(cfg):
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _gemm_variants(kernel, dtype, adapter, precision, cfg, all_flags=False):
    """F2 or B2 at one config; every feature-flag combination when all_flags, else the heaviest."""
    flag_names = ("HAS_BIAS", "BASE_GEMM") if kernel is lora_linear_fwd_kernel else ("HAS_DROPOUT", "BASE_GEMM")
    combos = itertools.product((True, False), repeat=2) if all_flags else [(True, True)]
    return [_variant(kernel, dtype, adapter, _gemm_config(cfg), INPUT_PRECISION=precision,
                     **dict(zip(flag_names, flags))) for flags in combos]


def _small_kernel_variants(dtype, adapter, precision, r_pad, all_flags=False):
    """F1, dA and B1 (memory-bound rank-R kernels) at one padded rank."""
    dropout = (True, False) if all_flags else (True,)
    fused_db = r_pad <= configs.FUSED_DB_MAX_RANK
    v_db = ((True, fused_db), (True, False), (False, True)) if all_flags and fused_db else ((True, fused_db),)
    out = []
    for d in dropout:
        out.append(_variant(lora_down_kernel, dtype, adapter, configs.down_config(r_pad, ELEM_BYTES[dtype], False),
                            HAS_DROPOUT=d, INPUT_PRECISION=precision, R_PAD=r_pad))
        out.append(_variant(lora_adapter_grad_kernel, dtype, adapter,
                            configs.adapter_grad_config(r_pad, ELEM_BYTES[dtype], False),
                            HAS_DROPOUT=d, INPUT_PRECISION=precision, R_PAD=r_pad))
    for compute_v, compute_db in v_db:
        out.append(_variant(lora_grad_dy_kernel, dtype, adapter,
                            configs.grad_dy_config(r_pad, ELEM_BYTES[dtype], False),
                            COMPUTE_V=compute_v, COMPUTE_DB=compute_db, INPUT_PRECISION=precision, R_PAD=r_pad))
    return out


def all_variants():
    """The variants the gate builds: every config the launchers can choose, every padded rank of
    the rank-R kernels, every dtype, every feature path, fp32 adapters under 16-bit activations."""
    out = []
    gemms = (lora_linear_fwd_kernel, lora_grad_x_kernel)
    cases = [  # (activations, adapters, dot input precision)
        ("bf16", "fp32", "ieee"),  # PEFT's default: bf16 model, fp32 adapters
        ("fp32", "fp32", "tf32"),  # fp32 with torch.backends.cuda.matmul.allow_tf32
        ("fp32", "fp32", "ieee"),  # fp32 without TF32
        ("fp16", "fp16", "ieee"),
        ("bf16", "bf16", "ieee"),
    ]
    for case_index, (dtype, adapter, precision) in enumerate(cases):
        main_case = case_index < 3
        # GEMMs: every candidate at the heaviest feature path, every feature path at the first candidate.
        # fp16, and bf16 with bf16 adapters, have the tile sizes of bf16 with fp32 adapters and lighter
        # adapter loads: their first candidate covers the change of MMA type.
        for kernel, gemm in zip(gemms, configs.GEMMS):
            gemm_cfgs = configs.gemm_configs(ELEM_BYTES[dtype], gemm)
            for i, cfg in enumerate(gemm_cfgs if main_case else gemm_cfgs[:1]):
                out += _gemm_variants(kernel, dtype, adapter, precision, cfg, all_flags=i == 0)
        # Rank-R kernels: every padded rank for the main cases, the extremes for the others.
        ranks = configs.PADDED_RANKS if main_case else (configs.PADDED_RANKS[0], configs.PADDED_RANKS[-1])
        for r_pad in ranks:
            out += _small_kernel_variants(dtype, adapter, precision, r_pad, all_flags=r_pad == 16)
    for out_dtype in DTYPES:
        out.append(_variant(reduce_partials_kernel, "fp32", out_dtype, configs.REDUCE_CONFIG))
    out.append(_variant(dropout_keep_mask_kernel, "fp32", "fp32", configs.DROPOUT_MASK_CONFIG))
    for dtype in DTYPES:
        for adapter in sorted({dtype, "fp32"}):
            for subtract in (False, True):
                out.append(_variant(lora_merge_kernel, dtype, adapter, configs.merge_config(False), SUBTRACT=subtract))
    # Misaligned tensors (views at odd offsets, K or N not multiples of 16) take the JIT's unaligned
    # specialization, which the launchers run with one fixed config.
    for dtype in ("bf16", "fp32"):
        fwd_cfg, grad_x_cfg = (_gemm_config(configs.unaligned_gemm_config(ELEM_BYTES[dtype], g)) for g in configs.GEMMS)
        out.append(_variant(lora_linear_fwd_kernel, dtype, "fp32", fwd_cfg, aligned=False, HAS_BIAS=True,
                            BASE_GEMM=True, INPUT_PRECISION="ieee"))
        out.append(_variant(lora_grad_x_kernel, dtype, "fp32", grad_x_cfg, aligned=False, BASE_GEMM=True,
                            HAS_DROPOUT=True, INPUT_PRECISION="ieee"))
    return list(dict.fromkeys(out))
