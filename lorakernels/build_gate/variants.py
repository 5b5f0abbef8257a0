"""Every kernel variant the launchers can choose on a GPU, generated from the kernel specs.

A variant is one kernel with concrete argument types, constexprs and launch options. Per spec
and dtype case (`KernelSpec.gate_cases`): every config the spec's config function offers, at
the heaviest feature path, and every valid feature path at the first config (for the rank-R
kernels: at the smallest padded rank); every padded rank in the main cases, the extremes in
the others; the unaligned fallback where the spec has one. Argument types follow the roles in
the spec (activations in x's dtype, U/V/partials in fp32, adapters in x's dtype or fp32) and
the JIT's specialization for the usual aligned case: pointers, and the sizes and strides the
spec marks aligned, divisible by 16.
"""

import dataclasses

from lorakernels.ops.configs import PADDED_RANKS
from lorakernels.plan import low_rank_math, split_rank_term
from lorakernels.ops.specs import ALL, ELEM_BYTES, Desc, Ptr, Role, Scalar, Seed, Size, Stride

_POINTER_TYPE = {Role.FP32: "*fp32", Role.INT8: "*i8", Role.UINT8: "*u8", Role.INT32: "*i32"}


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    spec: object
    dtype: str  # activation dtype
    adapter_dtype: str
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    aligned: bool = True
    seed_pointer: bool = False  # the dropout seed read from memory (a device seed: CUDA graphs)

    @property
    def name(self):
        return self.spec.name

    @property
    def kernel(self):
        return self.spec.kernel

    def _type(self, arg):
        if isinstance(arg, Ptr):
            return {Role.ACTIVATION: "*" + self.dtype, Role.ADAPTER: "*" + self.adapter_dtype}.get(
                arg.role, _POINTER_TYPE.get(arg.role))
        if isinstance(arg, Desc):  # a host-side TMA descriptor with the config's block
            consts = dict(self.constexprs)
            dtype = {Role.ACTIVATION: self.dtype, Role.ADAPTER: self.adapter_dtype}.get(arg.role, "fp32")
            return f"tensordesc<{dtype}[{', '.join(str(consts[b]) for b in arg.block)}]>"
        if isinstance(arg, Seed) and self.seed_pointer:
            return "*i64"
        return "fp32" if isinstance(arg, Scalar) else "i32"

    def signature(self):
        """(signature, constexprs, attrs) for triton.compiler.ASTSource."""
        consts = dict(self.constexprs)
        runtime = iter(self.spec.args)
        sig, attrs = {}, {}
        for i, name in enumerate(self.kernel.arg_names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            arg = next(runtime)
            sig[name] = self._type(arg)
            divisible = isinstance(arg, Ptr) or (isinstance(arg, (Size, Stride)) and arg.aligned)
            if self.aligned and divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, consts, attrs

    def describe(self):
        c = dict(self.constexprs)
        blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK") if k in c)
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs
                         if not k.startswith("BLOCK") and k not in ("GROUP_M",))
        return (f"{self.name} {self.dtype}/{self.adapter_dtype} {blocks} w{self.num_warps}s{self.num_stages} "
                f"{flags}{'' if self.aligned else ' unaligned'}{' seed-pointer' if self.seed_pointer else ''}")


def _case_constexprs(spec, dtype, adapter_dtype, precision):
    """The constexprs a dtype case sets, as the launchers derive them (`lorakernels.plan`)."""
    rank_fp32, rank_precision = low_rank_math(dtype == "fp32", adapter_dtype == "fp32", precision)
    case = {"INPUT_PRECISION": precision, "RANK_FP32": rank_fp32, "RANK_PRECISION": rank_precision,
            "SPLIT_RANK": split_rank_term(dtype == "fp32", adapter_dtype == "fp32")}
    return {k: v for k, v in case.items() if k in spec.case_constexprs}


def _variant(spec, dtype, adapter_dtype, config, case, r_pad, flags, aligned=True):
    config = dict(config)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    constexprs = {**config, **flags, **case, **({"R_PAD": r_pad} if r_pad is not None else {})}
    return KernelVariant(spec, dtype, adapter_dtype, tuple(sorted(constexprs.items())), warps, stages, aligned)


def spec_variants(spec):
    """The variants of one kernel spec (see the module docstring)."""
    out = []
    for case_index, (dtype, adapter, precision) in enumerate(spec.gate_cases):
        main = case_index < spec.main_cases
        case = _case_constexprs(spec, dtype, adapter, precision)
        ranks = [None]
        if "R_PAD" in spec.case_constexprs:
            ranks = PADDED_RANKS if main else (PADDED_RANKS[0], PADDED_RANKS[-1])
        for r_pad in ranks:
            candidates = spec.configs(spec.config_bytes(ELEM_BYTES[dtype], case), r_pad)
            paths = spec.flag_combinations(r_pad)
            for i, config in enumerate(candidates if main else candidates[:1]):
                every_path = i == 0 and r_pad in (None, PADDED_RANKS[0])
                out += [_variant(spec, dtype, adapter, config, case, r_pad, flags)
                        for flags in (paths if every_path else paths[:1])]
        if spec.unaligned_config is not None and adapter == "fp32" and precision == "ieee":
            out.append(_variant(spec, dtype, adapter, spec.unaligned_config(ELEM_BYTES[dtype]), case, None,
                                spec.flag_combinations()[0], aligned=False))
        if case_index == 0 and any(isinstance(a, Seed) for a in spec.args):
            # The variant a device seed takes (its seed a pointer), at the first config on the heaviest
            # path a device seed reaches: one adapter (several in one batch keep host seeds,
            # `functional._fused`).
            r_pad = ranks[0]
            config = spec.configs(spec.config_bytes(ELEM_BYTES[dtype], case), r_pad)[0]
            flags = next(f for f in spec.flag_combinations(r_pad) if not f.get("SEGMENTED"))
            out.append(dataclasses.replace(_variant(spec, dtype, adapter, config, case, r_pad, flags),
                                           seed_pointer=True))
    return out


def all_variants():
    """The variants the gate builds, for every kernel spec."""
    return list(dict.fromkeys(v for spec in ALL for v in spec_variants(spec)))
