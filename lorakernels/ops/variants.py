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
    lora_grad_a_kernel,
    lora_grad_dy_kernel,
    lora_grad_x_kernel,
    reduce_partials_kernel,
)
from lorakernels.kernels.lora_forward import lora_down_kernel, lora_linear_fwd_kernel
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
    "lora_grad_a_kernel": dict(act=("x_ptr",), adapter=(), fp32=("v_ptr", "da_part_ptr"),
                               aligned=("K", "stride_xm"), floats=("p",)),
    "reduce_partials_kernel": dict(act=(), adapter=("out_ptr",), fp32=("part_ptr",), aligned=("numel",),
                                   floats=("scaling",)),
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


def _precision(dtype):
    # fp32 activations take the TF32 tensor-core path when torch allows TF32, IEEE FMA otherwise.
    return ("tf32", "ieee") if dtype == "fp32" else ("ieee",)


def _gemm_config(cfg):
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def all_variants():
    """Every variant the launchers can launch on a GPU (see the module docstring)."""
    out = []
    for dtype, r_pad in itertools.product(DTYPES, configs.PADDED_RANKS):
        adapters = ("fp32",) if dtype == "fp32" else (dtype, "fp32")
        for adapter, precision in itertools.product(adapters, _precision(dtype)):
            # F2 and B2 with every GEMM candidate; the feature paths are cheap to enumerate at the
            # heaviest tile (the first candidate that fits), the full config list at the heaviest path.
            gemms = configs.gemm_configs(r_pad, ELEM_BYTES[dtype])
            for i, cfg in enumerate(gemms):
                heavy_only = i > 0 or precision == "ieee" and dtype == "fp32" and r_pad > 16
                fwd_flags = [(True, True)] if heavy_only else list(itertools.product((True, False), repeat=2))
                for has_bias, base in fwd_flags:
                    out.append(_variant(lora_linear_fwd_kernel, dtype, adapter, _gemm_config(cfg), HAS_BIAS=has_bias,
                                        BASE_GEMM=base, INPUT_PRECISION=precision, R_PAD=r_pad))
                bwd_flags = [(True, True)] if heavy_only else list(itertools.product((True, False), repeat=2))
                for base, dropout in bwd_flags:
                    out.append(_variant(lora_grad_x_kernel, dtype, adapter, _gemm_config(cfg), BASE_GEMM=base,
                                        HAS_DROPOUT=dropout, INPUT_PRECISION=precision, R_PAD=r_pad))
            for dropout in (True, False):
                out.append(_variant(lora_down_kernel, dtype, adapter, configs.down_config(r_pad, False),
                                    HAS_DROPOUT=dropout, INPUT_PRECISION=precision, R_PAD=r_pad))
                out.append(_variant(lora_grad_a_kernel, dtype, adapter, configs.grad_a_config(r_pad, False),
                                    HAS_DROPOUT=dropout, INPUT_PRECISION=precision, R_PAD=r_pad))
            for compute_v, compute_db in ((True, True), (True, False), (False, True)):
                out.append(_variant(lora_grad_dy_kernel, dtype, adapter, configs.grad_dy_config(r_pad, False),
                                    COMPUTE_V=compute_v, COMPUTE_DB=compute_db, INPUT_PRECISION=precision,
                                    R_PAD=r_pad))
    for out_dtype in DTYPES:
        out.append(_variant(reduce_partials_kernel, "fp32", out_dtype, configs.REDUCE_CONFIG))
    out.append(_variant(dropout_keep_mask_kernel, "fp32", "fp32", configs.DROPOUT_MASK_CONFIG))
    # Misaligned tensors (views at odd offsets, odd K or N) take the JIT's unaligned specialization.
    out.append(_variant(lora_linear_fwd_kernel, "bf16", "fp32", _gemm_config(configs.GEMM_CANDIDATES[0]),
                        aligned=False, HAS_BIAS=True, BASE_GEMM=True, INPUT_PRECISION="ieee", R_PAD=16))
    out.append(_variant(lora_grad_x_kernel, "bf16", "fp32", _gemm_config(configs.GEMM_CANDIDATES[0]),
                        aligned=False, BASE_GEMM=True, HAS_DROPOUT=True, INPUT_PRECISION="ieee", R_PAD=16))
    return list(dict.fromkeys(out))
