"""The benchmark suite (`python -m benchmarks`): layer, merge, model-level and QLoRA benchmarks.

On a CUDA device it runs the GPU protocol, in about 4-5 minutes on an H200 (the LoRAFusion
shapes: K = N in {4096, 5120, 8192} at 4096 tokens, r = 16, alpha = 16, dropout 0.1 and 0, and
2048 and 8192 tokens at K = N = 4096, bf16; the host overhead of a tiny layer; the merge; mixed
batches over 1, 4 and 16 adapters against PEFT's adapter_names loop; a ~1B-class Llama training
step and inference at batch 1 / seq 128 and 32 / 512; QLoRA (NF4 base, with bitsandbytes
installed) against PEFT's QLoRA layer and Unsloth's dequantize-to-buffer method, per layer and
on the ~1B Llama in 4 bits). Elsewhere it runs a small CPU protocol: memory, saved bytes and
parameters are the same quantities, and the timings are CPU timings (lorakernels on its torch
backend), labelled so, in the results and in the closing summary.

Progress goes to stderr as it happens: a line as each measurement finishes, and a bar over every
section on a terminal (--no-progress: none). The results files are rewritten after every step of
every section, so that a run cut off by a time limit keeps what it finished.

Writes results.csv (long format: one metric per row), results.json (with the environment),
results.md, and PNG plots when matplotlib is installed, to --output-dir: by default
benchmarks/results/local/<protocol>, which git ignores, so that a run leaves the committed
results alone (those are regenerated with an explicit --output-dir benchmarks/results/<protocol>).
"""

import argparse
import contextlib
import csv
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.bench_kernels import kernel_benchmarks
from benchmarks.bench_layer import failure, graphed_benchmarks, layer_benchmarks, merge_benchmark
from benchmarks.bench_model import model_benchmark_parts
from benchmarks.bench_qlora import (
    QLORA_MODEL_VARIANTS,
    QLORA_PROVIDERS,
    qlora_layer_benchmarks,
    qlora_model_benchmarks,
)
from benchmarks.bench_segmented import SEGMENTED_PROVIDERS, segmented_benchmarks
from benchmarks.harness import Budget, Progress, environment, installed
from benchmarks.report import summary, write_markdown, write_plots

PROTOCOLS = {
    # The GPU protocol fits in 5 minutes on an H200. Its time, estimated from its measurement counts
    # (the seconds each section took are in results.json's environment, to check against): one
    # do_bench call costs its 25 ms of warm-up and timed runs, 6 more runs (its first call and its
    # 5-run estimate) and an L2 flush per run: ~30-45 ms at these shapes, whose runs take 0.2-5 ms.
    #   layer      8 shapes x 10 providers x 3 modes x 5 rounds = 1200 calls           ~ 44 s
    #              inference after merge 8 x 3 x 5 = 120 calls; the GEMM main loop against cuBLAS
    #              at 5 (M, K, N) x 2 GEMMs x 3 providers x 5 rounds = 150 calls       ~ 10 s
    #              autotuning F2 and B2, Triton and TMA strategies, over 5 candidates (~0.13 s each)
    #              per (token bucket, N, K): 5 x 4 x 5                                  ~ 13 s
    #              compiling ~50 kernel variants at ~1.2 s where Triton's cache is cold
    #              (gpu_session.sh's numerics phase, run before, compiles part of them)  ~ 60 s
    #              PEFT under torch.compile, forward and backward, at one shape         ~ 25 s
    #              base_gemm="auto" timing its 2-3 strategies once per kind of GEMM pass
    #              (~20 ms each): 8 shapes x 2 passes, the model's ~25 kinds            ~  3 s
    #   overhead   10 x 3 x 5 samples of 20 calls, autotuning at its token bucket        ~  5 s
    #   kernels    each pass alone against its bound (bench_kernels): 2 shapes x 2 adapter dtypes
    #              x 2 p x 9 timings x 5 rounds = 360 calls, the rank-R kernels' variants  ~ 25 s
    #   merge      2 shapes x 2 x 5 calls                                                ~  2 s
    #   segmented  3 adapter counts x 3 providers x 3 modes x 5 rounds = 135 calls, and the
    #              segmented kernels' variants                                           ~ 15 s
    #   model      5 variants built twice (timed together, then peak memory one at a time) ~ 20 s,
    #              10 rounds x 5 steps of ~0.1 s, autotuning 4 (N, K) x 2 kernels at 3 token
    #              buckets, the bias-free F2 variants, inference: 3 models and a merged copy,
    #              2 shapes x 4 x 10 forwards                                            ~ 50 s
    #   qlora      (with bitsandbytes only) 2 shapes x 5 x 3 x 5 = 150 calls, the 4-bit kernels'
    #              variants, the model step: 4 quantized variants built twice, 10 x 4 steps ~ 50 s
    #   start-up   imports, CUDA context                                                 ~ 10 s
    # About 260 s without bitsandbytes, 310 s with it. Sections run in this order, QLoRA last, each
    # written as it finishes: a run cut off by a time limit loses the fewest.
    "gpu": dict(
        # 5 rounds of do_bench, each 5 ms of warm-up and 20 ms of timed runs per provider: the
        # windows of one do_bench call with its defaults (25 + 100 ms), split into rounds.
        dtype=torch.bfloat16, budget=Budget(rounds=5, round_ms=20),
        # LoRAFusion's shapes (r = 16, p = 0.1, K = N in {4096, 5120, 8192}) at 4096 tokens, each also
        # without dropout; 2048 and 8192 tokens at K = 4096 only.
        layer_shapes=[(4096, k, k, 16, p) for k in (4096, 5120, 8192) for p in (0.1, 0.0)]
        + [(t, 4096, 4096, 16, 0.1) for t in (2048, 8192)],
        # torch.compile compiles per shape (~25 s each): PEFT + compile is timed at one shape only.
        compile_shapes=[(4096, 4096, 4096, 16, 0.1)],
        merge=[(4096, 4096, 16), (8192, 8192, 16)],
        overhead_shape=(16, 64, 64, 16, 0.1),
        # Each kernel pass alone against its bound (bench_kernels), rank 16, bf16 activations.
        kernels=dict(shapes=[(4096, 4096, 4096), (512, 4096, 4096)], r=16),
        model=dict(size=dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
                   batch=4, seq=1024, inference=[(1, 128), (32, 512)]),
        # QLoRA (bench_qlora): NF4 base, bf16 compute; dequant-cublas runs at p = 0 only.
        qlora=dict(layer_shapes=[(4096, 4096, 4096, 16, 0.1), (4096, 4096, 4096, 16, 0.0)],
                   model=dict(size=dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
                              batch=4, seq=1024)),
        # Mixed batches (bench_segmented): 32 sequences of 128 tokens over 1, 4 and 16 rank-16 adapters.
        segmented=dict(sequences=32, seq_len=128, K=4096, N=4096, r=16, adapters=(1, 4, 16)),
    ),
    "cpu": dict(
        # Rounds go on for at least 0.5 s per measurement (>= 15 samples per provider).
        dtype=torch.float32, budget=Budget(rounds=15, seconds=0.5),
        layer_shapes=[(256, 256, 256, 16, 0.1), (256, 256, 256, 16, 0.0), (512, 512, 512, 16, 0.1)],
        merge=[(512, 512, 16)],
        overhead_shape=(16, 64, 64, 16, 0.1),
        model=dict(size=dict(vocab=1000, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2),
                   batch=2, seq=64, inference=[(1, 128), (4, 128)]),
        # QLoRA in bf16 as it runs on GPUs: the saved and weight bytes are the GPU's.
        qlora=dict(layer_shapes=[(256, 256, 256, 16, 0.1), (256, 256, 256, 16, 0.0)],
                   model=dict(size=dict(vocab=1000, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2),
                              batch=2, seq=64)),
        segmented=dict(sequences=16, seq_len=32, K=256, N=256, r=16, adapters=(1, 4, 16)),
    ),
}
OVERHEAD_CALLS = 20  # host overhead: one sample is a batch of this many back-to-back calls
PROVIDERS = ["floor", "lorakernels", "lorakernels-fused", "lorakernels-tma", "lorakernels-cublas", "unfused", "peft",
             "peft-patched", "peft+compile", "full-ft", "adapter"]


def run(device, protocol, providers=None, skip_model=False, progress=True, layer_shapes=None, budget=None,
        checkpoint=None, skip_qlora=False, skip_segmented=False):
    """Run a protocol. Returns (records, failures, section_seconds).

    `budget` (a harness.Budget) replaces the protocol's budget per measurement.
    `progress`: a harness.Progress, or True (a line on stderr per measurement, and a bar over every
    section where stderr is a terminal) or False (nothing).
    `checkpoint(records, failures, seconds)`, if given, is called after each step of every section
    (a layer shape, an adapter count, the model's training steps and its inference, ...) and at
    each section's end, so that a run stopped by a time limit still leaves what it finished.
    """
    p = PROTOCOLS[protocol]
    progress = Progress(lines=progress) if isinstance(progress, bool) else progress
    records, failures, seconds = [], [], {}
    # Providers named on the command line select QLoRA's too; none of QLoRA's named: no QLoRA section.
    qlora_names = None if providers is None else [n for n in providers if n in QLORA_PROVIDERS]
    segmented_names = None if providers is None else [n for n in providers if n in SEGMENTED_PROVIDERS]
    skip_qlora = skip_qlora or qlora_names == []
    skip_segmented = skip_segmented or segmented_names == []
    providers = providers or PROVIDERS
    # Shapes given on the command line: PEFT + compile at the first of them (it compiles per shape).
    compile_shapes = layer_shapes[:1] if layer_shapes else p.get("compile_shapes", ())
    layer_shapes = layer_shapes or p["layer_shapes"]
    budget = budget or p["budget"]

    # (name, steps, parts): parts() yields the section's records a step at a time, measuring each
    # when asked for it; steps: how many steps of the progress bar the section reports.
    sections = [
        ("layer", len(layer_shapes),
         lambda: _layer_section(device, p, providers, layer_shapes, compile_shapes, budget, progress, failures)),
        ("overhead", 1, lambda: [_overhead_section(device, p, providers, budget, failures, progress)]),
    ]
    if "kernels" in p and _kernels_runnable(device):
        sections.append(("kernels", len(p["kernels"]["shapes"]),
                         lambda: _kernels_section(device, p, budget, failures, progress)))
    sections += [
        ("merge", len(p["merge"]), lambda: _merge_section(device, p, budget, failures, progress)),
    ]
    if not skip_segmented:
        q = p["segmented"]
        sections.append(("segmented", len(q["adapters"]),
                         lambda: _segmented_section(device, p, budget, failures, segmented_names, progress)))
    if _model_section_enabled(skip_model):
        sections.append(("model", 2, lambda: _model_section(device, p, budget, failures, progress)))
    if _qlora_section_enabled(skip_qlora):
        with_model = not skip_model and installed("transformers")
        model_names = None if qlora_names is None else [n for n in qlora_names if n in QLORA_MODEL_VARIANTS]
        with_model = with_model and model_names != []
        sections.append(("qlora", len(p["qlora"]["layer_shapes"]) + with_model,
                         lambda: _qlora_section(device, p, budget, failures, qlora_names, model_names, with_model,
                                                progress)))
    progress.expect(sum(steps for _, steps, _ in sections))
    progress.section("benchmarks", f"{protocol} protocol on {device.type}: "
                     + ", ".join(f"{name} ({steps} step{'s' if steps != 1 else ''})" for name, steps, _ in sections))
    try:
        for name, steps, parts in sections:
            progress.section(name, f"started ({steps} step{'s' if steps != 1 else ''})")
            start = time.perf_counter()
            for part in parts():
                records += part
                seconds[name] = time.perf_counter() - start
                if checkpoint:
                    checkpoint(records, failures, seconds)
            seconds[name] = time.perf_counter() - start
            if checkpoint:
                checkpoint(records, failures, seconds)
            progress.note(f"done in {seconds[name]:.1f} s")
    finally:
        progress.close()
    return records, failures, seconds


def protocol_budget(protocol, rounds=None, seconds=None):
    """The protocol's harness.Budget per measurement, with `rounds` and `seconds` replaced where given."""
    given = dict(rounds=rounds, seconds=seconds)
    return PROTOCOLS[protocol]["budget"]._replace(**{k: v for k, v in given.items() if v is not None})


def _layer_section(device, p, providers, layer_shapes, compile_shapes, budget, progress, failures):
    """Yields the layer benchmarks' records one shape at a time, measuring each when asked for it."""
    for shape in layer_shapes:
        names = [n for n in providers if n != "peft+compile" or shape in compile_shapes]
        yield layer_benchmarks(device, [shape], p["dtype"], names, budget, progress=progress, failures=failures)


def _overhead_section(device, p, providers, budget, failures, progress):
    """Host overhead: a layer so small that per-call Python and kernel launches set the time."""
    tiny = layer_benchmarks(device, [p["overhead_shape"]], p["dtype"], [n for n in providers if n != "peft+compile"],
                            budget, progress=progress, failures=failures, extras=False, calls=OVERHEAD_CALLS)
    records = [dict(r, benchmark="overhead") for r in tiny]
    if device.type == "cuda":  # the same layers captured in CUDA graphs and replayed
        try:
            records += graphed_benchmarks(device, p["overhead_shape"], p["dtype"], providers, budget, OVERHEAD_CALLS,
                                          progress, failures)
        except Exception as error:  # noqa: BLE001 - reported, and the run goes on
            failures.append(failure("overhead", "CUDA graphs", error))
    return records


def _kernels_runnable(device):
    from lorakernels.plan import interpreting

    return device.type == "cuda" or interpreting()


def _kernels_section(device, p, budget, failures, progress):
    """Yields each shape's kernel-pass records (bench_kernels), timed against their bounds."""
    q = p["kernels"]
    for shape in q["shapes"]:
        try:
            records, _ = kernel_benchmarks(device, [shape], r=q["r"], dtype=p["dtype"], budget=budget,
                                           progress=progress.note)
        except Exception as error:  # noqa: BLE001 - reported, and the run goes on
            failures.append(failure("kernels", "x".join(map(str, shape)), error))
            records = []
        progress.step()
        yield records


def _merge_section(device, p, budget, failures, progress):
    """Yields each merge shape's records."""
    for N, K, r in p["merge"]:
        records = []
        try:
            records = merge_benchmark(device, N, K, r, p["dtype"], budget)
            progress.note(f"{N} x {K}, r = {r}")
        except Exception as error:  # noqa: BLE001 - reported, and the run goes on
            failures.append(failure("merge", f"{N} x {K}, r = {r}", error))
        finally:
            progress.step()
        yield records


def _segmented_section(device, p, budget, failures, names, progress):
    """Yields each adapter count's records."""
    q = p["segmented"]
    for n in q["adapters"]:
        yield segmented_benchmarks(device, q["sequences"], q["seq_len"], q["K"], q["N"], q["r"], (n,), p["dtype"],
                                   budget, failures, names, progress=progress)


def _model_section_enabled(skip_model):
    """False when skipped, or when transformers is missing (said so unless skipped anyway)."""
    if not installed("transformers"):
        if not skip_model:
            print("transformers is not installed: skipping the model-level benchmarks (pip install -e '.[bench]')")
        return False
    return not skip_model


def _qlora_section_enabled(skip_qlora):
    """False when skipped, or when bitsandbytes is missing (said so unless skipped anyway)."""
    if skip_qlora:
        return False
    if not installed("bitsandbytes"):
        print("bitsandbytes is not installed: skipping the QLoRA benchmarks (pip install -e '.[qlora]')")
        return False
    return True


def _qlora_section(device, p, budget, failures, names, model_names, with_model, progress):
    """Yields the QLoRA layer benchmarks' records (the providers `names`, None: all) a shape at a time,
    then (`with_model`) the QLoRA model step's, for the model variants `model_names` (None: all)."""
    q = p["qlora"]
    for shape in q["layer_shapes"]:
        yield qlora_layer_benchmarks(device, [shape], torch.bfloat16, budget, failures, names, progress=progress)
    if with_model:
        m = q["model"]
        yield qlora_model_benchmarks(device, m["size"], m["batch"], m["seq"], torch.bfloat16, 16, budget, failures,
                                     model_names, progress=progress)


def _model_section(device, p, budget, failures, progress):
    """Yields the model's training-step records, then its inference records."""
    m = p["model"]
    return model_benchmark_parts(device, m["size"], m["batch"], m["seq"], p["dtype"], 16, 0.1, budget,
                                 m["inference"], failures=failures, progress=progress)


def write(records, env, out_dir, failures=(), plots=True):
    """results.csv, results.json, results.md (and the plots) in out_dir. Each file is written whole
    and then renamed into place: a run interrupted while it writes, or a copy taken meanwhile (the
    GPU session collects results while the suite runs), finds the previous version or the new one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["benchmark", "provider", "mode", "M", "K", "N", "r", "dropout", "adapters", "dtype", "metric", "value",
              "p20",
              "p80", "unit", "device", "torch", "triton", "timestamp"]
    with _replacing(out_dir / "results.csv") as path, open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({**rec, **{k: env[k] for k in ("device", "torch", "triton", "timestamp")}})
    with _replacing(out_dir / "results.json") as path:
        path.write_text(json.dumps(dict(environment=env, records=records, failures=list(failures)), indent=1))
    with _replacing(out_dir / "results.md") as path:
        write_markdown(records, env, path, failures)
    return write_plots(records, env, out_dir) if plots else []


@contextlib.contextmanager
def _replacing(path):
    """Yields a temporary path next to `path`, renamed to `path` once the block has written it."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results/local/<gpu|cpu> (ignored by "
                        "git; the committed results are regenerated with --output-dir benchmarks/results/<gpu|cpu>)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None, help="default: the device's")
    every_provider = list(dict.fromkeys(PROVIDERS + list(SEGMENTED_PROVIDERS) + list(QLORA_PROVIDERS)))
    parser.add_argument("--providers", nargs="+", choices=every_provider, default=None,
                        help="layer, mixed-batch and QLoRA providers to run (default: all)")
    parser.add_argument("--layer-shapes", nargs="+", type=_layer_shape, default=None, metavar="M,K,N,r,p",
                        help="layer shapes instead of the protocol's: tokens, in, out features, rank, dropout")
    parser.add_argument("--repeats", type=int, default=None, help="at least this many rounds per measurement, each "
                        "timing every provider once (on CUDA a round is one do_bench call per provider)")
    parser.add_argument("--seconds", type=float, default=None, help="rounds go on for at least this long per "
                        "measurement (the CPU protocol: 0.5)")
    parser.add_argument("--skip-model", action="store_true", help="no model-level benchmarks (QLoRA's included)")
    parser.add_argument("--skip-qlora", action="store_true", help="no QLoRA benchmarks")
    parser.add_argument("--skip-segmented", action="store_true", help="no mixed-batch (several adapters) benchmarks")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr (by default a line as each "
                        "measurement finishes, and a progress bar on a terminal)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    protocol = args.protocol or ("gpu" if device.type == "cuda" else "cpu")
    env = dict(environment(device), protocol=protocol,
               note="GPU timings" if device.type == "cuda" else
               "CPU timings, lorakernels on its torch backend: not a measure of the Triton kernels nor of GPU speed")
    budget = protocol_budget(protocol, args.repeats, args.seconds)
    env["budget"] = budget._asdict()
    out_dir = args.output_dir or default_output_dir(protocol)
    progress = Progress(lines=not args.no_progress)
    progress.section("benchmarks", f"{protocol} protocol on {env['device']} ({env['note']}); results written to "
                     f"{out_dir} as they are measured")
    start = time.perf_counter()

    def checkpoint(records, failures, seconds):  # tables only: the plots are drawn once, at the end
        write(records, dict(env, seconds=dict(seconds, total=time.perf_counter() - start)), out_dir, failures,
              plots=False)

    records, failures, seconds = run(device, protocol, args.providers, args.skip_model, progress, args.layer_shapes,
                                     budget, checkpoint, args.skip_qlora, args.skip_segmented)
    env["seconds"] = dict(seconds, total=time.perf_counter() - start)
    plots = write(records, env, out_dir, failures)
    print(Path(out_dir, "results.md").read_text())
    print("\n".join(summary(records, env["note"])))
    print(f"wrote {out_dir}/results.csv, results.json, results.md" + (f", {len(plots)} plots" if plots else ""))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in env["seconds"].items()))
    if failures:
        print(f"{len(failures)} measurement(s) FAILED (listed in results.md)")
    return 1 if failures else 0


def default_output_dir(protocol):
    """Where a run writes without --output-dir: a directory git ignores (benchmarks/results/.gitignore)."""
    return Path(__file__).resolve().parent / "results" / "local" / protocol


def _layer_shape(text):
    try:
        M, K, N, r, p = text.split(",")
        return int(M), int(K), int(N), int(r), float(p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,K,N,r,p (e.g. 4096,4096,4096,16,0.1); got {text!r}") from None
