"""Each kernel pass of one layer against its bound: `python -m benchmarks.bench_kernels`.

For each shape, dropout p and adapter dtype, times every pass of the fused layer on its own, on
the operands a training step gives it, next to what the hardware allows:

- F1 (dropout + down-projection U = dropout(X) A^T), B1 (V = s dY B, and dB at small ranks, with
  its reduction) and B3 (dA = V^T dropout(X), with its reduction): memory-bound, so their bound
  is one pass over the bytes they must move (X or dY in, U or V out, the factors) at the
  device's copy bandwidth, measured in the same run (a device-to-device copy of 1 GiB);
- F2 (X W^T + b + s U B^T) and B2 (dY W + masked (V A)): the fused GEMMs, next to cuBLAS on
  the same frozen GEMM (`torch.addmm` / `torch.mm`), and next to `F2 auto` / `B2 auto`, what
  `base_gemm="auto"` runs (its choice named).

Writes kernels.json and kernels.md to --output-dir (default benchmarks/results/local/kernels,
ignored by git). On a CPU the passes run through the Triton interpreter (set TRITON_INTERPRET=1
before the run, as the tests do) at a small shape: a check that the script works, not timings.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.harness import Budget, bench, environment

GPU_SHAPES = [(4096, 4096, 4096), (512, 4096, 4096)]  # (M tokens, K in_features, N out_features)
CPU_SHAPES = [(64, 32, 48)]
COPY_BYTES = 1 << 30


def copy_bandwidth(device, budget):
    """Bytes per second of a device-to-device copy (read + write counted), measured now."""
    n = COPY_BYTES // 2 if device.type == "cuda" else 1 << 22
    src = torch.empty(n // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds, _, _ = bench(lambda: dst.copy_(src), device, budget)
    return 2 * src.nbytes / seconds


def _operands(M, K, N, r, dtype, adapter_dtype, device):
    from lorakernels.operands import Adapter, DenseWeight

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = randn(M, K)
    weight, bias = randn(N, K, scale=K**-0.5), randn(N)
    lora_A, lora_B = randn(r, K, scale=K**-0.5, dtype=adapter_dtype), randn(N, r, scale=0.1, dtype=adapter_dtype)
    dy = randn(M, N)
    return x, DenseWeight(weight, bias), lora_A, lora_B, dy, Adapter


def kernel_passes(M, K, N, r, p, dtype, adapter_dtype, device):
    """{pass name: (callable, bytes it must move at least, or None for a GEMM)} and the cuBLAS
    references {name: callable}; the callables run one pass each on prepared operands."""
    from lorakernels.ops import configs
    from lorakernels.ops import lora_linear as passes
    from lorakernels.operands import GradsNeeded
    from lorakernels.plan import resolve_plan

    x, base, lora_A, lora_B, dy, Adapter = _operands(M, K, N, r, dtype, adapter_dtype, device)
    adapter = Adapter(lora_A, lora_B, 16 / r, p, 1234)
    plans = {name: resolve_plan(device, "triton", name) for name in ("triton", "auto")}
    u = passes.down_projection_pass(x, adapter, plans["triton"])
    needs = GradsNeeded(True, True, True)
    backward = passes.plan_backward(needs, r)
    rank_math = plans["triton"].low_rank(dtype, adapter_dtype)
    db = torch.empty_like(lora_B)
    v = passes.pass_over_dy(dy, u, adapter, db, backward, rank_math)
    da = torch.empty_like(lora_A)
    y = torch.empty(M, N, device=device, dtype=dtype)
    e, ea, rp = x.element_size(), lora_A.element_size(), configs.padded_rank(r)
    out = {
        "F1": (lambda: passes.down_projection_pass(x, adapter, plans["triton"]), M * K * e + r * K * ea + M * rp * 4),
        "F2": (lambda: passes.forward_gemm_pass(x, base, u, adapter, plans["triton"], y), None),
        "F2 auto": (lambda: passes.forward_gemm_pass(x, base, u, adapter, plans["auto"], y), None),
        "B1": (lambda: passes.pass_over_dy(dy, u, adapter, db, backward, rank_math), M * N * e + N * r * ea + M * rp * 4),
        "B2": (lambda: passes.dx_gemm_pass(dy, base, v, adapter, plans["triton"]), None),
        "B2 auto": (lambda: passes.dx_gemm_pass(dy, base, v, adapter, plans["auto"]), None),
        "B3": (lambda: passes.adapter_grad_pass(v, x, da, 1.0, adapter.seed, p, rank_math),
               M * K * e + M * rp * 4 + r * K * ea),
    }
    if not backward.db_in_dy_pass:  # dB by its own pass over dY at large ranks
        out["B3 dB"] = (lambda: passes.adapter_grad_pass(u, dy, db.t(), adapter.scaling, 0, 0.0, rank_math),
                        M * N * e + M * rp * 4 + r * N * ea)
    cublas = {"F2": lambda: torch.addmm(base.bias, x, base.weight.t()), "B2": lambda: torch.mm(dy, base.weight)}
    return out, cublas


def kernel_benchmarks(device, shapes, r=16, dropouts=(0.1, 0.0), dtype=torch.bfloat16,
                      adapter_dtypes=(torch.float32, torch.bfloat16), budget=None, progress=None):
    """Records (dicts) of every pass's time and bound, for each shape, p and adapter dtype."""
    from lorakernels.ops import gemm_strategy

    budget = budget or Budget(rounds=5, round_ms=20)
    bandwidth = copy_bandwidth(device, budget)
    records = []
    for M, K, N in shapes:
        for adapter_dtype in adapter_dtypes:
            for p in dropouts:
                passes, cublas = kernel_passes(M, K, N, r, p, dtype, adapter_dtype, device)
                gemm_times = {name: bench(fn, device, budget)[0] for name, fn in cublas.items()}
                for name, (fn, least_bytes) in passes.items():
                    seconds, p20, p80 = bench(fn, device, budget)
                    gemm = name.split()[0]
                    bound = least_bytes / bandwidth if least_bytes is not None else gemm_times[gemm]
                    # The suite's long format (benchmarks/suite.py): provider = the pass, mode = the
                    # adapters' dtype; the bound and its kind alongside.
                    record = dict(benchmark="kernels", provider=name, mode=f"{_name(adapter_dtype)} adapters", M=M,
                                  K=K, N=N, r=r, dropout=p, dtype=_name(dtype), metric="time", value=seconds,
                                  p20=p20, p80=p80, unit="s", bound_seconds=bound,
                                  bound="cuBLAS" if least_bytes is None else "one pass at copy bandwidth",
                                  ratio=seconds / bound)
                    if name.endswith("auto"):
                        chosen = [v.value for k, v in gemm_strategy.chosen_strategies().items()
                                  if k[0] == gemm and k[2] == (N if gemm == "F2" else K)]
                        record["chosen"] = chosen[-1] if chosen else "triton"
                    records.append(record)
                    if progress:
                        progress(f"{M}x{K}x{N} {record['mode']} p={p} {name}: {seconds * 1e6:.1f} us "
                                 f"({record['ratio']:.2f}x bound)")
    return records, bandwidth


def _name(dtype):
    return str(dtype).split(".")[-1]


def table(records):
    """Markdown lines of the kernel-pass records: each pass's time next to its bound."""
    lines = ["| M | K | N | adapters | p | pass | time | bound | x bound | auto ran |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['mode'].split()[0]} | {r['dropout']} | {r['provider']} | "
                     f"{r['value'] * 1e6:.1f} us | {r['bound_seconds'] * 1e6:.1f} us ({r['bound']}) | "
                     f"{r['ratio']:.2f} | {r.get('chosen', '')} |")
    return lines


def write(records, bandwidth, env, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(dict(environment=env, copy_bandwidth=bandwidth,
                                                          records=records), indent=1))
    lines = [f"# Kernel passes against their bounds ({env['device']}; torch {env['torch']}, triton {env['triton']}; "
             f"{env['timestamp']})", "",
             f"Copy bandwidth measured in the same run: {bandwidth / 1e12:.2f} TB/s. Memory-bound passes (F1, B1, B3) "
             "are set against one pass over the bytes they must move at that bandwidth; the fused GEMMs (F2, B2) "
             "against cuBLAS on the same frozen GEMM. Times are medians.", "", *table(records)]
    (out_dir / "kernels.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("on a CPU the kernels run through the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    budget = Budget(rounds=5, round_ms=20) if device.type == "cuda" else Budget(rounds=1)
    records, bandwidth = kernel_benchmarks(device, shapes, r=args.rank, budget=budget,
                                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    out_dir = args.output_dir or Path(__file__).parent / "results" / "local" / "kernels"
    write(records, bandwidth, environment(device), out_dir)
    print(f"wrote {out_dir}/kernels.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
