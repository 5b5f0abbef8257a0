"""Launch configurations: the config functions that the kernel specs (`ops.specs`) name.

The launchers and the ahead-of-time build gate both read them through the specs, so the
gate builds exactly what a launcher can pick. A config is a dict of block constexprs plus
`num_warps` and `num_stages`; every function takes (elem_bytes of the activations, padded
rank) and returns its GPU candidates, best guess first. Under the Triton interpreter
(`TRITON_INTERPRET=1`) every kernel runs with its spec's fixed `INTERPRETER_*` config
(autotune needs a GPU driver). On a GPU the two large GEMMs (forward F2, dX B2) are
autotuned over their candidates (per N, K, BASE_GEMM, dtypes and power-of-two token
bucket: `ops.specs.token_bucket`); the memory-bound rank-R kernels have one config per
padded rank. None of these have been tuned on a GPU yet: they are the usual Hopper/Ampere
starting points, kept to those that build for sm_80 and sm_90 within shared memory and
without register spills, as tests/test_aot_build.py checks for every config these functions
can return.
"""

# Padded ranks the kernels are built for: ranks 1..256 padded to a power of two >= 16.
PADDED_RANKS = (16, 32, 64, 128, 256)


def cdiv(a, b):
    """ceil(a / b) for ints on the host (`triton.cdiv` is a constexpr function: ~6 us a call from Python)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (n >= 1), on the host (see `cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_rank(r):
    """Rank padded to a power of two >= 16: `tl.dot` needs every dimension >= 16 on a GPU."""
    return max(16, next_power_of_2(r))


def _gemm(bm, bn, bk, warps, stages, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps,
            "num_stages": stages}


# Candidates for the fused GEMMs (F2 forward, B2 dX): output tile BLOCK_M x BLOCK_N,
# reduction step BLOCK_K, in both kernels (they are one GEMM core).
# A 128 x 128 tile takes 8 warps: with 4, its fp32 accumulator alone is 128 registers a
# thread, and the build gate measured spills (dX kernel with dropout: 3-4 KiB of stack on
# sm_80 and sm_90; benchmarks/results/aot_build.md).
# 128 x 128 x 32 (8 warps, 3 stages) was dropped: with the split rank-R term of fp32 adapters
# (SPLIT_RANK) the dX kernel spilled 64 B on sm_90 under triton 3.6 (build gate).
GEMM_CANDIDATES = (
    _gemm(128, 128, 64, 8, 3),
    _gemm(128, 64, 64, 4, 4),
    _gemm(64, 128, 64, 4, 4),
    _gemm(64, 64, 64, 4, 3),
    _gemm(64, 64, 32, 4, 2),
)

# fp32 activations: on the IEEE (non-TF32) path tl.dot runs on FMA units with both operand
# tiles in registers; 64 x 64 x 32 spilled there (16-32 B of stack on sm_80 and sm_90, build
# gate), so fp32 launches use 16-wide K steps, TF32 or not. The dX kernel also carries the
# Philox mask of its LoRA term: with 4 warps triton 3.6 spilled it (8-24 B of stack on sm_80
# and sm_90), so it takes 8; the forward kernel spilled with 8 on triton 3.9 and keeps 4.
F2_FP32_CONFIG = _gemm(64, 64, 16, 4, 3)
B2_FP32_CONFIG = _gemm(64, 64, 16, 8, 3)

# 4-bit base weights (QLoRA): the dequantization (a gather from the code table and one from the
# absmax per weight element) costs registers per element of the weight tile, so the tiles take a
# 32-wide reduction step; the 16-bit candidates with BLOCK_K 64 spilled 8 B-1.4 KiB, and 64 x 128
# x 32 with 4 or 8 warps 8-40 B on sm_80 (build gate).
FOUR_BIT_CANDIDATES = (
    _gemm(128, 128, 32, 8, 3),
    _gemm(128, 64, 32, 4, 3),
    _gemm(64, 64, 32, 8, 3),
)
FOUR_BIT_FP32_CONFIG = _gemm(64, 64, 16, 8, 3)
# B2 also carries the Philox mask of its LoRA term: its larger tiles spilled 16-128 B under
# triton 3.6 (sm_80 and sm_90), and its fp32 tile 8 B (build gate).
FOUR_BIT_B2_CANDIDATES = (_gemm(64, 64, 32, 8, 3),)
FOUR_BIT_B2_FP32_CONFIG = _gemm(64, 32, 16, 4, 3)


def f2_4bit_configs(elem_bytes, r_pad=None):
    """F2 candidates over a 4-bit base weight."""
    return list(FOUR_BIT_CANDIDATES) if elem_bytes == 2 else [FOUR_BIT_FP32_CONFIG]


def b2_4bit_configs(elem_bytes, r_pad=None):
    """B2 candidates over a 4-bit base weight."""
    return list(FOUR_BIT_B2_CANDIDATES) if elem_bytes == 2 else [FOUR_BIT_B2_FP32_CONFIG]


def f2_4bit_unaligned_config(elem_bytes):
    """The one F2 config over a 4-bit base for activations that miss the 16-byte alignment."""
    return FOUR_BIT_CANDIDATES[-1] if elem_bytes == 2 else FOUR_BIT_FP32_CONFIG


def b2_4bit_unaligned_config(elem_bytes):
    """The one B2 config over a 4-bit base for activations that miss the 16-byte alignment."""
    return b2_4bit_configs(elem_bytes)[-1]


# Tensors that miss the JIT's 16-byte alignment (views at odd offsets, sizes or row strides
# not multiples of 16) get no vectorized loads and need more address registers: the large
# tiles spill there (measured by the build gate), so such 16-bit launches take this one config
# (fp32 keeps its own, already small).
UNALIGNED_GEMM_CONFIG = _gemm(64, 64, 32, 4, 3)

INTERPRETER_GEMM_CONFIG = _gemm(32, 64, 32, 4, 1, group_m=4)

# Hopper (sm_90) TMA-persistent F2/B2, 16-bit activations only: the usual Hopper starting points
# (128 x 128 and 128 x 256 output tiles, BLOCK_K 64, 3-4 stages, 8 warps = two warpgroups),
# kept to those the build gate accepts (no spills, shared memory within 227 KiB). Unmeasured.
TMA_GEMM_CANDIDATES = (
    _gemm(128, 128, 64, 8, 3),
    _gemm(128, 128, 64, 8, 4),
    _gemm(128, 256, 64, 8, 3),
    _gemm(128, 64, 64, 4, 4),
)


def f2_tma_configs(elem_bytes, r_pad=None):
    """F2 TMA-persistent candidates (16-bit activations; the launcher routes fp32 elsewhere)."""
    return list(TMA_GEMM_CANDIDATES)


def b2_tma_configs(elem_bytes, r_pad=None):
    """B2 TMA-persistent candidates: no 128 x 256 tile, whose Philox mask for the LoRA term spilled
    about 3.9 KiB on sm_90 (build gate, triton 3.9)."""
    return [c for c in TMA_GEMM_CANDIDATES if c["BLOCK_N"] != 256]


def f2_configs(elem_bytes, r_pad=None):
    """F2 (forward GEMM) candidates for `elem_bytes`-byte activations, any rank (16-rank chunks)."""
    return list(GEMM_CANDIDATES) if elem_bytes == 2 else [F2_FP32_CONFIG]


# B2's 64 x 64 x 64 tile takes 8 warps: with 4, bf16 with the Philox mask of its LoRA term
# spilled 24 B on sm_80 (build gate, triton 3.9).
B2_CANDIDATES = tuple(_gemm(64, 64, 64, 8, 3) if c == _gemm(64, 64, 64, 4, 3) else c for c in GEMM_CANDIDATES)


def b2_configs(elem_bytes, r_pad=None):
    """B2 (dX GEMM) candidates, as `f2_configs`."""
    return list(B2_CANDIDATES) if elem_bytes == 2 else [B2_FP32_CONFIG]


def f2_unaligned_config(elem_bytes):
    """The one F2 config for operands that miss the 16-byte alignment."""
    return UNALIGNED_GEMM_CONFIG if elem_bytes == 2 else F2_FP32_CONFIG


def b2_unaligned_config(elem_bytes):
    """The one B2 config for operands that miss the 16-byte alignment."""
    return UNALIGNED_GEMM_CONFIG if elem_bytes == 2 else B2_FP32_CONFIG


# The rank-R kernels keep an fp32 [BLOCK, R_PAD] accumulator in registers: past rank 64 they
# use 8 warps and 32-row tiles so that it and the V/U tiles fit without spills (one exception,
# measured: B3 with fp32 rank math at rank 256, see `b3_configs`). fp32
# activations halve the K/N tile so that tiles (and the Philox work on them) cost the same
# registers. Each choice here was checked for spills by the build gate.
INTERPRETER_RANK_CONFIG = {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
INTERPRETER_B1_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def f1_configs(elem_bytes, r_pad):
    """F1 (dropout + down-projection): memory-bound, one config per padded rank and dtype size."""
    small = r_pad <= 64 and elem_bytes == 2
    return [{"BLOCK_M": 64 if small else 32,
             # 64 spilled 8-16 B at rank 128 (gate); fp32 products at rank 256 under bf16 x with
             # segments spilled 8 B with 32 on sm_90 (gate)
             "BLOCK_K": 64 if small else 16 if elem_bytes == 4 and r_pad > 128 else 32,
             # fp32 at rank 64 spilled 8 B with 4 warps on sm_80 (triton 3.6, gate)
             "num_warps": 4 if small else 8, "num_stages": 3}]


def b1_configs(elem_bytes, r_pad):
    """B1 (V, and at small ranks the dB partials, from one pass over dY).

    BLOCK_M sets how many dB partials exist (M / BLOCK_M slabs of N x R fp32 each).
    """
    if r_pad <= 64:
        return [{"BLOCK_M": 128 if elem_bytes == 2 else 64, "BLOCK_N": 64 if elem_bytes == 2 else 32,
                 "num_warps": 8, "num_stages": 3}]
    # fp32 rank-256 products with 3xTF32 dots spilled 48-144 B at 64 rows (build gate): 32 rows.
    return [{"BLOCK_M": 32 if elem_bytes == 4 and r_pad > 128 else 64, "BLOCK_N": 32, "num_warps": 8,
             "num_stages": 3}]


def b3_configs(elem_bytes, r_pad):
    """B3: dA and (at large ranks) dB^T partials, V^T Xd over slices of rows."""
    if elem_bytes == 2:
        return [{"BLOCK_M": 64 if r_pad <= 64 else 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}]
    # Rank 256 takes 4 warps: with 8, ptxas (triton 3.9) fitted the TF32 segmented kernel into 128
    # registers on sm_80 with an 8 B spill once the dropout mask cost one Philox call per 4 elements
    # (164 registers, no spill, at one call per element); with 4: 158-192 registers, no spill, on
    # sm_80 and sm_90 (build gate).
    return [{"BLOCK_M": 32 if r_pad <= 64 else 16, "BLOCK_K": 32, "num_warps": 4 if r_pad > 128 else 8,
             "num_stages": 2}]


# dB joins B1's pass over dY up to this padded rank. Its partials cost 2 x (M / BLOCK_M) x N x R x 4
# bytes (written, then read by the reduction) against M x N x 2 for a second read of bf16 dY:
# cheaper while R < BLOCK_M / 4 = 32 at BLOCK_M = 128.
FUSED_DB_MAX_RANK = 32

MERGE_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 1}  # fp64 tiles: memory-bound
INTERPRETER_MERGE_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
REDUCE_CONFIG = {"BLOCK": 1024, "num_warps": 4, "num_stages": 1}
DROPOUT_MASK_CONFIG = {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}

# The rank-R passes cut their reduction (F1: K, B1: N, B3: rows) into ranges until the grid reaches
# this many programs: a GPU of 132 SMs (H100/H200) filled twice over. A constant rather than the
# device's SM count, so that the split, and with it the rounding of U, V and dA, is the same on
# every GPU; no split where the grid alone is this large.
RANK_PASS_TARGET_PROGRAMS = 2 * 132
