#!/usr/bin/env bash
# One GPU session, prepared: the test suite on the GPU, the numerics table, and the benchmark
# suite, each phase time-boxed, everything it measured collected under OUT_DIR.
#
#   benchmarks/gpu_session.sh OUT_DIR [tests] [numerics] [bench]      (default: all three)
#
# Runs from the repository root with the machine's own python3 (torch, triton, transformers,
# peft, matplotlib, pytest already installed; nothing is installed or downloaded here; the QLoRA
# benchmarks run where bitsandbytes is installed, as the last section: a cut-off run loses them first).
# Time boxes: tests 200 s (the suite took 151 s on 12 processes of an H200 machine), numerics 120 s
# (kernel compilation and autotuning dominate), bench 335 s (the GPU protocol is estimated at
# 230-280 s: benchmarks/suite.py), each followed by at most 15 s of grace after its interruption:
# 700 s at worst, which leaves the machine's start within 15 minutes of GPU time. Where one command
# may run at most 10 minutes, run `tests numerics` (350 s at worst) and `bench` (350 s) as two
# commands.
# OUT_DIR receives at most six files: env.txt, tests.log, numerics.md, bench.log, results.md
# and results.tgz (numerics.json and the suite's results.csv/json/md and plots), refreshed
# after every phase, and every 15 s while the benchmarks run (they write their results after each
# shape), so that a command cut off by its time limit still leaves what finished. A phase that
# reaches its time box is interrupted (SIGINT, then SIGKILL 15 s later) and the next one runs.
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
        # compiling Inductor graphs on one thread so that 12 workers do not start 12 pools.
        parallel=()
        python3 -c "import xdist" 2>/dev/null && parallel=(-n 12)
        LORAKERNELS_TEST_DEVICE=cuda TORCHINDUCTOR_COMPILE_THREADS=1 timeout -s INT -k 15 200 python3 -m pytest -q \
            -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} --deselect tests/test_aot_build.py -rf tests \
            2>&1 | tee "$out/tests.log" || status=1
        ;;
    numerics)
        timeout -s INT -k 15 120 python3 -m benchmarks.verify_numerics --device cuda --output-dir "$work" 2>&1 \
            | tail -n 5 || status=1
        ;;
    bench)
        # Progress: a line per measurement on stderr, shown here and kept in bench.log.
        echo "python3 -m benchmarks --device cuda (at most 335 s; results collected every 15 s)"
        ( timeout -s INT -k 15 335 python3 -m benchmarks --device cuda --output-dir "$work/gpu" 2>&1 \
              | tee "$out/bench.log"; exit "${PIPESTATUS[0]}" ) &
        bench=$!
        while kill -0 "$bench" 2>/dev/null; do
            for _ in {1..15}; do kill -0 "$bench" 2>/dev/null && sleep 1; done
            collect
        done
        wait "$bench" || status=1
        sed -n '/^summary/,$p' "$out/bench.log"
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
