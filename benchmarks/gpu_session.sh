#!/usr/bin/env bash
# One GPU session, prepared: the test suite on the GPU, the numerics table, and the benchmark
# suite, each phase time-boxed, everything it measured collected under OUT_DIR.
#
#   benchmarks/gpu_session.sh OUT_DIR [tests] [numerics] [bench]      (default: all three)
#
# Runs from the repository root with the machine's own python3 (torch, triton, transformers,
# peft, matplotlib, pytest already installed; nothing is installed or downloaded here).
# OUT_DIR receives at most six files: env.txt, tests.log, numerics.md, bench.log, results.md
# and results.tgz (numerics.json and the suite's results.csv/json/md and plots), ready to be
# unpacked into benchmarks/results/ and committed with the GPU name and versions in env.txt.
# Budget on an H200: tests ~4 min, numerics <1 min, benchmarks ~5 min; the phases can run as
# separate calls.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [tests] [numerics] [bench]}
shift
phases=${*:-tests numerics bench}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -m pip list 2>/dev/null | grep -iE '^(peft|transformers|pytest|pytest-xdist|matplotlib) '
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

for phase in $phases; do
    echo "== $phase"
    case $phase in
    tests)
        # Every test on CUDA tensors with compiled kernels; the ahead-of-time build gate is
        # CPU-side and runs in CI. Compilation dominates: spread it over processes.
        parallel=()
        python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
        LORAKERNELS_TEST_DEVICE=cuda timeout 270 python3 -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} \
            --deselect tests/test_aot_build.py -rf tests 2>&1 | tee "$out/tests.log" || status=1
        ;;
    numerics)
        timeout 120 python3 -m benchmarks.verify_numerics --device cuda --output-dir "$work" 2>&1 | tail -n 5 \
            || status=1
        cp "$work/numerics.md" "$out/" 2>/dev/null
        ;;
    bench)
        timeout 420 python3 -m benchmarks --device cuda --no-progress --output-dir "$work/gpu" \
            > "$out/bench.log" 2>&1 || status=1
        sed -n '/^summary:/,$p' "$out/bench.log"
        grep -E '^FAILED' "$out/bench.log"
        cp "$work/gpu/results.md" "$out/" 2>/dev/null
        ;;
    *)
        echo "unknown phase $phase (tests, numerics, bench)" >&2
        exit 2
        ;;
    esac
done

tar czf "$out/results.tgz" -C "$work" . && rm -rf "$work"
echo "status $status; files in $out: $(ls "$out" | tr '\n' ' ')"
exit $status
