#!/usr/bin/env bash
# One GPU session, prepared: the test suite on the GPU, the numerics table, and the benchmark
# suite, each phase time-boxed, everything it measured collected under OUT_DIR.
#
#   benchmarks/gpu_session.sh OUT_DIR [tests] [numerics] [bench]      (default: all three)
#
# Runs from the repository root with the machine's own python3 (torch, triton, transformers,
# peft, matplotlib, pytest already installed; nothing is installed or downloaded here; the QLoRA
# benchmarks run where bitsandbytes is installed, as the last section: a cut-off run loses them first).
# Time boxes: tests 200 s, numerics 120 s (kernel compilation and autotuning dominate), bench
# 400 s (the protocol aims at 5 minutes). Where one command may run at most 10 minutes, run
# `tests numerics` and `bench` as two commands.
# OUT_DIR receives at most six files: env.txt, tests.log, numerics.md, bench.log, results.md
# and results.tgz (numerics.json and the suite's results.csv/json/md and plots), refreshed
# after every phase so that a command cut off by its time limit still leaves what finished.
# Unpack results.tgz into benchmarks/results/ and commit it with env.txt's GPU and versions.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [tests] [numerics] [bench]}
shift
phases=${*:-tests numerics bench}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0

collect() {
    cp "$work/numerics.md" "$work/gpu/results.md" "$out/" 2>/dev/null
    tar czf "$out/results.tgz" -C "$work" .
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -m pip list 2>/dev/null | grep -iE '^(numpy|peft|transformers|pytest|pytest-xdist|matplotlib|bitsandbytes) '
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

for phase in $phases; do
    echo "== $phase"
    case $phase in
    tests)
        # Every test on CUDA tensors with compiled kernels; the ahead-of-time build gate is
        # CPU-side and runs in CI. Compilation dominates: spread it over processes, each
        # compiling Inductor graphs on one thread so that 8 workers do not start 8 pools.
        parallel=()
        python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
        LORAKERNELS_TEST_DEVICE=cuda TORCHINDUCTOR_COMPILE_THREADS=1 timeout 200 python3 -m pytest -q \
            -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} --deselect tests/test_aot_build.py -rf tests \
            2>&1 | tee "$out/tests.log" || status=1
        ;;
    numerics)
        timeout 120 python3 -m benchmarks.verify_numerics --device cuda --output-dir "$work" 2>&1 | tail -n 5 \
            || status=1
        ;;
    bench)
        timeout 400 python3 -m benchmarks --device cuda --no-progress --output-dir "$work/gpu" \
            > "$out/bench.log" 2>&1 || status=1
        sed -n '/^summary:/,$p' "$out/bench.log"
        grep -E '^FAILED' "$out/bench.log"
        ;;
    *)
        echo "unknown phase $phase (tests, numerics, bench)" >&2
        exit 2
        ;;
    esac
    collect
done

rm -rf "$work"
echo "status $status; files in $out: $(ls "$out" | tr '\n' ' ')"
exit $status
