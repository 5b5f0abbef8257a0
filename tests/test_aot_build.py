"""Ahead-of-time build gate: every kernel variant the launchers can choose builds for sm_90
(H100/H200) and sm_80 (A100), fits the target's shared memory, spills no registers, and the
GEMM kernels use the target's tensor-core MMA (wgmma on sm_90, mma.sync on sm_80).

The builds run in a subprocess with TRITON_INTERPRET=0 (interpreted kernels cannot be
compiled); the variant list is `lorakernels.build_gate.variants.all_variants()`, generated
from the kernel specs whose config functions the launchers call. This would catch: a config over the shared-memory
limit, a tile that spills, a `tl.dot` with a dimension under 16, an operation a GPU backend
rejects, or a GEMM that silently lost its tensor-core path.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

from lorakernels.build_gate.aot import TARGETS, problems
from lorakernels.build_gate.variants import all_variants
from lorakernels.ops import specs
from lorakernels.ops.configs import PADDED_RANKS
from lorakernels.plan import low_rank_math

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    # A fresh compile cache: every variant is really built, nothing comes from an earlier run.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(out.parent / "triton-cache")}
    run = subprocess.run([sys.executable, "-m", "lorakernels.build_gate", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"the build script wrote no results:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_variant_was_built_for_every_target(builds):
    # Only the Hopper TMA kernels skip a target (sm_80 has no TMA); every other kernel builds for all.
    assert {s.code: set(s.targets) for s in specs.ALL if set(s.targets) != set(TARGETS)} == {
        "F2-TMA": {"sm_90"}, "B2-TMA": {"sm_90"}}
    expected = {(i, t) for i, v in enumerate(all_variants()) for t in TARGETS if t in v.spec.targets}
    assert {(b["index"], b["target"]) for b in builds} == expected


def test_every_build_fits_and_uses_tensor_cores(builds):
    failures = [f"{b['target']} {b['variant']}: {'; '.join(problems(b))}" for b in builds if problems(b)]
    assert not failures, f"{len(failures)} of {len(builds)} builds fail the gate:\n" + "\n".join(failures)


def test_gemm_builds_report_resources(builds):
    """The gate reads real numbers: registers > 0 and shared memory > 0 for every GEMM build."""
    gemms = [b for b in builds if b["gemm"] and b["ok"]]
    assert gemms and all(b["reg"] > 0 and b["shared"] > 0 for b in gemms)


def test_every_config_the_launchers_can_pick_is_in_the_gate():
    """No config escapes: each GEMM candidate the autotuner may be offered (per activation size),
    the unaligned fallback, and each rank-R kernel config at each padded rank are built."""
    built = {(v.name, v.dtype, v.aligned, dict(v.constexprs).get("R_PAD"),
              tuple(sorted((k, val) for k, val in v.constexprs if k.startswith("BLOCK") or k == "GROUP_M")),
              v.num_warps, v.num_stages) for v in all_variants()}

    def key(name, dtype, r_pad, cfg, aligned=True):
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        return (name, dtype, aligned, r_pad, tuple(sorted(cfg.items())), warps, stages)

    expected = []
    for dtype in ("bf16", "fp32"):
        elem_bytes = specs.ELEM_BYTES[dtype]
        for spec in (specs.F2, specs.B2):
            offered = spec.configs(elem_bytes)
            assert offered, f"no {spec.code} GEMM config for {dtype}"
            expected += [key(spec.name, dtype, None, cfg) for cfg in offered]
            expected.append(key(spec.name, dtype, None, spec.unaligned_config(elem_bytes), aligned=False))
        # The rank-R kernels choose by the size they compute in: fp32 adapters make it 4 (RANK_FP32).
        rank_kernels = (specs.F1, specs.B1, specs.B3)
        for adapters_fp32, r_pad, spec in itertools.product((False, True), PADDED_RANKS, rank_kernels):
            rank_fp32, _ = low_rank_math(dtype == "fp32", adapters_fp32, "ieee")
            config_bytes = spec.config_bytes(elem_bytes, {"RANK_FP32": rank_fp32})
            expected += [key(spec.name, dtype, r_pad, cfg) for cfg in spec.configs(config_bytes, r_pad)]
    missing = [k for k in expected if k not in built]
    assert not missing, f"configs the launchers can pick but the gate does not build: {missing}"
