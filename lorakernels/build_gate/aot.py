"""Ahead-of-time builds of every kernel variant for real GPUs, on a machine without one.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole GPU
toolchain (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on the CPU. For each variant in
`lorakernels.build_gate.variants.all_variants()` and each target this records what a GPU
would see: shared memory per block, registers and spills (the cubin's resource usage, read
with the cuobjdump shipped in the triton wheel), and which MMA instructions the PTX uses.

    python -m lorakernels.build_gate [--output-dir benchmarks/results] [--json PATH] [--jobs N]

Must run with TRITON_INTERPRET unset or 0: interpreted kernels cannot be compiled (the
kernels are decorated when lorakernels is imported, before this module runs, so `main`
refuses to start under the interpreter). `main` uses a fresh TRITON_CACHE_DIR unless one is
set, so that nothing is reused from earlier builds.
"""

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import triton

from lorakernels.plan import interpreting

# Targets: (name, compute capability, shared memory a block may use in bytes).
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump -res-usage printed no {key}:\n{text}")
        usage[key.lower()] = int(match.group(1))
    return usage


def build(variant_index, target):
    """Compile one variant for one target; returns a result dict (error recorded, not raised)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lorakernels.build_gate.variants import all_variants

    variant = all_variants()[variant_index]
    cc, smem_limit = TARGETS[target]
    result = dict(index=variant_index, kernel=variant.name, code=variant.spec.code, variant=variant.describe(),
                  target=target, gemm=variant.spec.gemm, tma_spec=variant.spec.tma, dtype=variant.dtype,
                  precision=dict(variant.constexprs).get("INPUT_PRECISION"), smem_limit=smem_limit)
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = variant.signature()
        compiled = triton.compile(ASTSource(variant.kernel, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        ptx = compiled.asm["ptx"]
        result.update(ok=True, shared=compiled.metadata.shared, wgmma="wgmma.mma_async" in ptx,
                      mma_sync="mma.sync" in ptx, tma="cp.async.bulk.tensor" in ptx,
                      **_resource_usage(compiled.asm["cubin"]))
    except Exception as exc:  # recorded per variant so one failure does not hide the others
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def problems(result):
    """What makes a build unacceptable on its target (an empty list when it passes)."""
    if not result["ok"]:
        return [result["error"]]
    found = []
    if result["shared"] > result["smem_limit"]:
        found.append(f"shared memory {result['shared']} B > {result['smem_limit']} B")
    if result["stack"] or result["local"]:
        found.append(f"register spills: STACK {result['stack']} B, LOCAL {result['local']} B")
    if result.get("tma_spec") and not result["tma"]:
        found.append("no cp.async.bulk.tensor in the PTX (the descriptor loads did not become TMA)")
    # GEMMs must take the tensor-core path of their target (fp32 IEEE dots have none, by definition).
    if result["gemm"] and result["dtype"] == "fp32" and result["precision"] == "ieee":
        return found
    if result["gemm"] and result["target"] == "sm_90" and not result["wgmma"]:
        found.append("no wgmma in the sm_90 PTX (fell back from warpgroup MMA)")
    if result["gemm"] and result["target"] == "sm_80" and not result["mma_sync"]:
        found.append("no mma.sync in the sm_80 PTX")
    return found


def build_all(jobs=None, codes=None):
    """Build every variant (or those of the kernels whose spec codes are in `codes`) for every target."""
    from lorakernels.build_gate.variants import all_variants

    tasks = [(i, t) for i, v in enumerate(all_variants()) if codes is None or v.spec.code in codes
             for t in TARGETS if t in v.spec.targets]
    jobs = jobs or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(build, *zip(*tasks)))


def _instructions(result):
    """The tensor-core MMA (and TMA) a build's PTX uses, for the tables."""
    mma = "wgmma" if result["wgmma"] else "mma.sync" if result["mma_sync"] else "none"
    return mma + " + TMA" if result.get("tma") else mma


def summary_rows(results):
    """Per (kernel, target): variants built, passing, max registers, max shared memory, max spill bytes."""
    rows = {}
    for r in results:
        row = rows.setdefault((r["kernel"], r["target"]), dict(built=0, passed=0, reg=0, shared=0, spill=0, mma=set()))
        row["built"] += 1
        row["passed"] += not problems(r)
        if r["ok"]:
            row["reg"] = max(row["reg"], r["reg"])
            row["shared"] = max(row["shared"], r["shared"])
            row["spill"] = max(row["spill"], r["stack"] + r["local"])
            row["mma"] |= {_instructions(r)}
    return rows


def markdown(results):
    lines = [f"Ahead-of-time builds, triton {triton.__version__}: {len(results)} builds, "
             f"{sum(not problems(r) for r in results)} pass. Generated by `python -m lorakernels.build_gate`.",
             "", "Per kernel and target (maxima over its variants):", "",
             "| kernel | target | variants | pass | max regs | max shared (B) | max spills (B) | MMA used |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, target), row in sorted(summary_rows(results).items()):
        lines.append(f"| {kernel} | {target} | {row['built']} | {row['passed']} | {row['reg']} | {row['shared']} | "
                     f"{row['spill']} | {', '.join(sorted(row['mma']))} |")
    lines += ["", "Every build:", "",
              "| target | kernel variant | regs | shared (B) | spills (stack/local B) | MMA | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["target"], r["kernel"], r["index"])):
        if r["ok"]:
            mma = _instructions(r)
            lines.append(f"| {r['target']} | {r['variant']} | {r['reg']} | {r['shared']} | "
                         f"{r['stack']}/{r['local']} | {mma} | {'yes' if not problems(r) else 'NO'} |")
        else:
            lines.append(f"| {r['target']} | {r['variant']} | - | - | - | - | NO: build failed |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lorakernels.build_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="write aot_build.md and aot_build.json here")
    parser.add_argument("--json", default=None, help="write the raw results to this file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    parser.add_argument("--only", default=None, help="comma-separated spec codes (F1,F2,B1,B2,B3,...) to build; "
                        "default: every kernel")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    # A fresh compile cache unless one is given: every run really builds every variant.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lorakernels-aot-"))
    start = time.perf_counter()
    results = build_all(args.jobs, args.only.split(",") if args.only else None)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "aot_build.json").write_text(json.dumps(results, indent=1))
        (out / "aot_build.md").write_text(markdown(results))
    failed = [r for r in results if problems(r)]
    for r in failed:
        print(f"FAIL {r['target']} {r['variant']}: {'; '.join(problems(r))}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0
