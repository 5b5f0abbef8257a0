"""Benchmark smoke tests: every provider computes what it claims (so a benchmark never times a
broken baseline), the suite's output files parse, and the timing statistics are sound
(quantiles from measured samples, ratios from providers timed in alternation). Seconds, on
the suite's device."""

import contextlib
import csv
import io
import json
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from benchmarks.harness import Budget, bench, interleave, one_call, quantile, summarize
from benchmarks.providers import make_providers
from lorakernels import LoRALinear, lora_linear_ref
from tests.utils import DEVICE


def test_lora_providers_compute_the_reference_function():
    providers = make_providers(48, 40, 4, torch.float32, 0.0, DEVICE)
    lora = providers["lorakernels"].module
    x = torch.randn(7, 48)
    expected = lora_linear_ref(x, lora.weight, lora.bias, lora.lora_A, lora.lora_B, lora.scaling)
    assert (expected - torch.nn.functional.linear(x, lora.weight, lora.bias)).abs().max() > 1e-3  # adapter matters
    for name, provider in providers.items():
        provider.module.train()
        y = provider.module(x)
        if provider.lora:
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=name)
    base = torch.nn.functional.linear(x, lora.weight, lora.bias)
    torch.testing.assert_close(providers["floor"].module(x), base)
    torch.testing.assert_close(providers["full-ft"].module(x), base)
    adapter = providers["adapter"].module
    expected_adapter = base + adapter.up(torch.nn.functional.gelu(adapter.down(base)))
    assert (expected_adapter - base).abs().max() > 1e-4  # timed with a non-zero up-projection
    torch.testing.assert_close(adapter(x), expected_adapter)


def test_trainable_parameter_counts():
    providers = make_providers(48, 40, 4, torch.float32, 0.1, DEVICE)
    lora_params = 4 * (48 + 40)
    assert providers["lorakernels"].trainable_parameters() == lora_params
    assert providers["unfused"].trainable_parameters() == lora_params
    assert providers["full-ft"].trainable_parameters() == 48 * 40 + 40
    assert providers["floor"].trainable_parameters() == 0
    assert abs(providers["adapter"].trainable_parameters() - lora_params) < 0.1 * lora_params
    if "peft" in providers:
        assert providers["peft"].trainable_parameters() == lora_params
        assert providers["peft-patched"].trainable_parameters() == lora_params


def test_dropout_providers_apply_dropout_in_training_only():
    """With dropout, LoRA providers' training-mode output differs from their eval-mode output."""
    providers = make_providers(64, 32, 4, torch.float32, 0.5, DEVICE, names=["lorakernels", "unfused", "peft-patched"])
    x = torch.randn(256, 64)
    for provider in providers.values():
        lora = provider.module
        lora.train()
        y_train = lora(x)
        lora.eval()
        y_eval = lora(x)
        assert not torch.allclose(y_train, y_eval)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m benchmarks` on a tiny protocol with every section, progress on and a progress bar
    drawn as on a terminal: the output directory, stdout, stderr, the run's harness.Progress and,
    for each results file written, the sections it held, its record count and whether it was the
    final write (with plots)."""
    from benchmarks import suite
    from benchmarks.harness import Progress

    out = tmp_path_factory.mktemp("suite")
    made, writes = [], []

    def progress(**kwargs):
        made.append(Progress(bar=True, **kwargs))
        return made[-1]

    def write(records, env, out_dir, failures=(), plots=True):
        writes.append((set(env["seconds"]) - {"total"}, len(records), plots))
        return original_write(records, env, out_dir, failures, plots)

    original_write = suite.write
    tiny = dict(vocab=50, hidden=64, intermediate=64, layers=1, heads=2, kv_heads=1)
    suite.PROTOCOLS["test"] = dict(
        suite.PROTOCOLS["cpu"], layer_shapes=[(16, 32, 24, 4, 0.1)], merge=[(32, 24, 4)], kernels=dict(
            shapes=[(16, 32, 24)], r=4),
        model=dict(size=tiny, batch=1, seq=8, inference=[(1, 8)]), budget=Budget(rounds=3),
        qlora=dict(layer_shapes=[(8, 64, 32, 4, 0.0)], model=dict(size=tiny, batch=1, seq=8)),
        segmented=dict(sequences=4, seq_len=3, K=32, N=24, r=4, adapters=(1, 4)))
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with mock.patch.object(suite, "Progress", progress), mock.patch.object(suite, "write", write), \
                contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = suite.main(["--device", DEVICE.type, "--protocol", "test", "--output-dir", str(out)])
    finally:
        del suite.PROTOCOLS["test"]
    assert status == 0, stdout.getvalue()[-3000:]
    (run_progress,) = made
    return SimpleNamespace(out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue(), progress=run_progress,
                           writes=writes)


SECTIONS = ("layer", "overhead", "kernels", "merge", "segmented", "model", "qlora")


def _sections_run():
    """The sections the tiny run has: QLoRA's where bitsandbytes is installed."""
    return [name for name in SECTIONS if name != "qlora" or _have("bitsandbytes")]


def test_suite_writes_parseable_results(tiny_run):
    tmp_path = tiny_run.out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(data["records"]) > 0
    assert {"layer", "overhead", "merge", "model"} <= {r["benchmark"] for r in rows}
    assert all(float(r["value"]) >= 0 for r in rows)
    for r in rows:  # quantiles are order statistics: never negative, never outside the samples
        if r["p20"]:
            assert 0 <= float(r["p20"]) <= float(r["value"]) <= float(r["p80"]), r
    assert {"ratio_to_floor", "ratio_to_unfused"} <= {r["metric"] for r in rows if r["benchmark"] == "layer"}
    assert {"ratio_to_full-ft", "ratio_to_base"} <= {r["metric"] for r in rows if r["benchmark"] == "model"}
    providers = {r["provider"] for r in rows if r["benchmark"] == "layer"}
    assert {"floor", "lorakernels", "unfused", "full-ft", "adapter"} <= providers
    text = (tmp_path / "results.md").read_text()
    assert "x floor" in text and "## Host overhead" in text and "## Kernel passes against their bounds" in text
    kernels = {(r["provider"], r["mode"]) for r in rows if r["benchmark"] == "kernels"}
    assert {("F1", "float32 adapters"), ("B2 auto", "bfloat16 adapters")} <= kernels
    segmented = [r for r in rows if r["benchmark"] == "segmented" and r["metric"] == "tokens_per_s"]
    assert {(r["adapters"], r["provider"]) for r in segmented} >= {(n, p) for n in ("1", "4")
                                                                  for p in ("lorakernels", "one-at-a-time")}
    assert "## Several adapters in one batch" in text
    if _have("bitsandbytes"):  # the QLoRA section runs when bitsandbytes is installed
        assert {"qlora-layer", "qlora-model"} <= {r["benchmark"] for r in rows}
        assert {"time", "saved_bytes", "weight_bytes"} <= {r["metric"] for r in rows if r["benchmark"] == "qlora-model"}
        assert "## QLoRA layer, full" in text and "## QLoRA layer memory" in text and "## QLoRA model" in text
    assert ("CPU timings, lorakernels on its torch backend" in text) == (DEVICE.type == "cpu")


def test_progress_covers_every_section(tiny_run):
    """Catches a section that runs silently: every one reports its start, a line as each of its
    measurements finishes, and its end, and the progress bar counts every section's steps (the
    bar once covered the layer table alone)."""
    modes = (" forward: ", " backward: ", " full: ")
    measurements = {"layer": modes + (" inference-merged",), "overhead": modes, "kernels": (" F1: ", " B3: "),
                    "merge": ("32 x 24, r = 4",),
                    "segmented": modes + ("1 adapters", "4 adapters"),
                    "model": ("training step timed", "inference b1 s8"), "qlora": modes + ("training step timed",)}
    lines = tiny_run.stderr.splitlines()
    for name in _sections_run():
        mine = [line.split(f"] {name}: ", 1)[1] for line in lines if f"] {name}: " in line]
        assert mine[0].startswith("started") and mine[-1].startswith("done in"), mine
        for what in measurements[name]:
            assert any(what in line for line in mine[1:-1]), (name, what, mine)
    progress = tiny_run.progress
    steps = {"layer": 1, "overhead": 1, "kernels": 1, "merge": 1, "segmented": 2, "model": 2, "qlora": 2}
    assert progress.total == progress.done == sum(steps[name] for name in _sections_run())
    assert f"0/{progress.total}" in tiny_run.stderr  # the bar was drawn with every section's steps


def test_every_section_is_written_as_it_finishes(tiny_run):
    """Catches a section whose results exist only once the whole run has finished (a run cut off
    by a time limit would lose them): some write before the final one holds each section."""
    *checkpoints, final = tiny_run.writes
    assert final[2] and not any(plots for _, _, plots in checkpoints)
    for name in _sections_run():
        assert any(name in sections for sections, _, _ in checkpoints), name
    counts = [count for _, count, _ in checkpoints]
    assert counts == sorted(counts) and counts[-1] == final[1]


def test_summary_says_what_the_timings_are(tiny_run):
    """Catches CPU ratios in the closing summary without the caveat that they are CPU timings of the
    torch backend, not GPU speed."""
    heading = next(line for line in tiny_run.stdout.splitlines() if line.startswith("summary"))
    if DEVICE.type == "cpu":
        assert "CPU timings, lorakernels on its torch backend" in heading and "not" in heading
        assert "GPU speed" in heading
    else:
        assert heading == "summary (GPU timings):"
    assert any(line.startswith("layer M=16 K=32") for line in tiny_run.stdout.splitlines())


def test_peft_is_compiled_at_one_shape_only(monkeypatch):
    """Catches a run that compiles PEFT at every layer shape (~25 s each on an H200; the GPU protocol
    must fit in 5 minutes): the GPU protocol compiles at one of its shapes, shapes given on the
    command line at the first of them, the host-overhead layer never."""
    from benchmarks import suite

    gpu = suite.PROTOCOLS["gpu"]
    assert len(gpu["compile_shapes"]) == 1 and set(gpu["compile_shapes"]) <= set(gpu["layer_shapes"])
    compiled = []

    def layer_benchmarks(device, shapes, dtype, providers, *args, **kwargs):
        compiled.append((shapes[0], "peft+compile" in providers))
        kwargs["progress"].step()
        return []

    monkeypatch.setattr(suite, "layer_benchmarks", layer_benchmarks)
    monkeypatch.setattr(suite, "merge_benchmark", lambda *args: [])
    shapes = [(64, 32, 32, 4, 0.1), (128, 32, 32, 4, 0.1)]
    suite.run(DEVICE, "cpu", layer_shapes=shapes, skip_model=True, skip_qlora=True, skip_segmented=True,
              progress=False)
    assert compiled == [(shapes[0], True), (shapes[1], False), (suite.PROTOCOLS["cpu"]["overhead_shape"], False)]


def test_qlora_providers_compute_the_reference_function():
    """Every QLoRA provider computes the LoRA function on the 4-bit weight, output and gradients (the
    dequant-cublas provider's backward is hand-written). Would catch a baseline that times wrong
    arithmetic, e.g. a transposed dequantized W or a missing scaling."""
    pytest.importorskip("bitsandbytes")
    from benchmarks.bench_qlora import make_qlora_providers

    providers, linear4bit = make_qlora_providers(128, 64, 4, torch.float32, 0.0, DEVICE)
    lora = providers["lorakernels"].module
    weight = lora.four_bit_base().dequantize(torch.float64)
    bias = linear4bit.bias.double()
    x = torch.randn(2, 5, 128, dtype=torch.float64)
    dy = torch.randn(2, 5, 64, dtype=torch.float64)
    for name, provider in providers.items():
        module = provider.module.train()
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        A, B = (next(p for n, p in params.items() if key in n) for key in ("lora_A", "lora_B")) if provider.lora \
            else (None, None)
        xr = x.clone().requires_grad_()
        expected = torch.nn.functional.linear(xr, weight, bias)
        if provider.lora:
            A64, B64 = (t.detach().double().requires_grad_() for t in (A, B))
            expected = expected + lora.scaling * (xr @ A64.t()) @ B64.t()
        expected.backward(dy)
        xf = x.float().requires_grad_()
        y = module(xf)
        y.backward(dy.float())
        scale = expected.abs().max().item()
        torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-4, atol=1e-4 * scale, msg=name)
        torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=1e-4, atol=1e-4 * xr.grad.abs().max().item(),
                                   msg=name)
        if provider.lora:
            for got, want in ((A.grad, A64.grad), (B.grad, B64.grad)):
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                           msg=name)
    assert set(providers) == {"lorakernels", "peft", "peft-patched", "dequant-cublas", "bnb-frozen"} - (
        set() if _have("peft") else {"peft", "peft-patched"})


def _have(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_peft_patched_provider_runs_the_fused_kernels_in_peft_layers():
    """Catches a `peft-patched` provider that times PEFT's own forward (a patch that never routes)."""
    pytest.importorskip("peft")
    from lorakernels import peft_patch_stats
    from peft.tuners.lora import Linear as PeftLinear

    providers = make_providers(16, 16, 2, torch.float32, 0.1, DEVICE, names=["peft-patched"])
    model = providers["peft-patched"].module
    assert isinstance(model.base_model.model.layer, PeftLinear)
    model(torch.randn(3, 16))
    assert peft_patch_stats(model)["fused"] == 1 and not peft_patch_stats(model)["fallback"]


def test_lorakernels_provider_is_the_real_module():
    providers = make_providers(16, 16, 2, torch.float32, 0.0, DEVICE, names=["lorakernels"])
    assert isinstance(providers["lorakernels"].module, LoRALinear)


def test_cublas_provider_is_the_same_layer_with_the_cublas_strategy():
    """No copy of the adapter (a copy would let the two providers drift apart) nor of the base weight."""
    providers = make_providers(16, 16, 2, torch.float32, 0.0, DEVICE, names=["lorakernels", "lorakernels-cublas"])
    if "lorakernels-cublas" not in providers:
        pytest.skip("the cuBLAS strategy needs the Triton kernels (CUDA or the interpreter)")
    lora, cublas = providers["lorakernels"].module, providers["lorakernels-cublas"].module
    assert isinstance(cublas, LoRALinear) and cublas.base_gemm == "cublas"
    for name in ("weight", "bias", "lora_A", "lora_B"):
        assert getattr(cublas, name) is getattr(lora, name), name


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("provider exploded")


def test_a_failing_provider_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    """A GPU session runs the suite once: one broken measurement must not cost the others."""
    from benchmarks import bench_layer, suite
    from benchmarks.providers import Provider

    def with_broken(*args, **kwargs):
        return {**make_providers(*args, **kwargs), "broken": Provider("broken", _Broken(), lora=False)}

    monkeypatch.setattr(bench_layer, "make_providers", with_broken)
    status = suite.main(["--device", DEVICE.type, "--skip-model", "--skip-qlora", "--skip-segmented", "--no-progress",
                         "--output-dir",
                         str(tmp_path), "--providers", "floor", "lorakernels", "--layer-shapes", "16,32,24,4,0.1",
                         "--repeats", "1", "--seconds", "0"])
    assert status == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["failures"] and {f["what"].split()[0] for f in data["failures"]} == {"broken"}
    assert all("provider exploded" in f["error"] for f in data["failures"])
    timed = {(r["provider"], r["mode"]) for r in data["records"] if r["metric"] == "time"}
    assert {("floor", "full"), ("lorakernels", "full"), ("lorakernels", "inference-merged")} <= timed
    assert "FAILED measurements" in (tmp_path / "results.md").read_text()


def test_layer_shape_option_rejects_malformed_shapes():
    from benchmarks import suite

    with pytest.raises(SystemExit):
        suite.main(["--layer-shapes", "16,32,24"])


def test_gemm_comparison_records_and_report(tmp_path):
    """The Triton-GEMM-vs-cuBLAS rows (CUDA in the suite; here through the interpreter)."""
    from benchmarks.bench_layer import gemm_benchmark
    from benchmarks.report import write_markdown

    records = gemm_benchmark(DEVICE, 64, 48, 32, torch.float32, Budget(rounds=1))
    assert {(r["provider"], r["mode"]) for r in records} == {
        (p, m) for p in ("triton-gemm", "cublas") for m in ("forward", "grad-x")}
    assert all(r["value"] > 0 for r in records)
    env = dict(protocol="test", device="d", torch="t", triton="t", timestamp="now", note="n")
    write_markdown(records, env, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| 64 | 48 | forward |" in text and "| 64 | 48 | grad-x |" in text


def test_an_interrupted_run_keeps_the_sections_it_finished(tmp_path, monkeypatch):
    from benchmarks import suite

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a time limit does mid-section

    monkeypatch.setattr(suite, "model_benchmark_parts", killed)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--device", DEVICE.type, "--no-progress", "--output-dir", str(tmp_path), "--providers", "floor",
                    "--layer-shapes", "16,32,24,4,0.0", "--repeats", "1", "--seconds", "0"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"layer", "overhead", "merge"} == {r["benchmark"] for r in data["records"]} - {"gemm"}
    assert set(data["environment"]["seconds"]) == {"layer", "overhead", "merge", "total"}


def test_memory_plots_from_cuda_style_records(tmp_path):
    """Peak-memory records (CUDA only in a real run) become per-provider bar plots."""
    pytest.importorskip("matplotlib")
    from benchmarks.report import write_plots

    layer = dict(benchmark="layer", mode="full", M=64, K=32, N=32, r=4, dropout=0.1, unit="B")
    records = [dict(layer, provider=p, metric=m, value=v) for p, v in (("floor", 1e6), ("lorakernels", 2e6))
               for m in ("saved_bytes", "peak_memory")]
    records += [dict(benchmark="model", mode="train-step", M=128, K=32, N=2, r=4, dropout=0.1, provider=p,
                     metric="peak_memory_incl_optimizer", value=v, unit="B") for p, v in (("full-ft", 3e9),
                                                                                         ("lorakernels", 1e9))]
    written = write_plots(records, dict(device="d"), tmp_path)
    assert sorted(p.name for p in written) == ["model_peak_memory.png", "peak_memory.png", "saved_bytes.png"]
    assert all(p.stat().st_size > 1000 for p in written)


REPO = Path(__file__).resolve().parents[1]


class _DriftingMachine:
    """A fake clock, and providers whose time is their cost times a slowdown that grows with the
    clock (a machine that gets busier as the run goes on)."""

    def __init__(self, drift):
        self.now, self.drift = 0.0, drift

    def __call__(self):
        return self.now

    def provider(self, cost):
        def run():
            self.now += cost * (1 + self.drift * self.now)
        return run


@pytest.mark.parametrize("samples", [[1e-3, 1e-2, 1e-2], [5.0], [2.0, 1.0], [1e-6] * 4 + [1.0]])
def test_quantiles_are_order_statistics_of_the_samples(samples):
    """Catches extrapolated percentiles: with three samples, statistics.quantiles put the 20th
    percentile of [1e-3, 1e-2, 1e-2] at -8e-4 s, below the fastest run and below zero."""
    median, p20, p80 = summarize(samples)
    assert p20 in samples and p80 in samples
    assert 0 <= min(samples) <= p20 <= median <= p80 <= max(samples)


def test_quantiles_stay_within_random_samples():
    rng = random.Random(0)
    for n in range(1, 40):
        samples = [rng.lognormvariate(-7, 1.5) for _ in range(n)]
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            assert quantile(samples, q) in samples
        median, p20, p80 = summarize(samples)
        assert min(samples) <= p20 <= median <= p80 <= max(samples)


def test_a_measurement_takes_at_least_its_rounds_and_its_seconds():
    """Catches a measurement of a handful of runs: the budget is rounds and seconds, whichever is longer."""
    machine = _DriftingMachine(drift=0.0)
    fns = {"a": machine.provider(0.1)}
    cpu = torch.device("cpu")
    for budget, rounds in ((Budget(rounds=3, seconds=2.0), 20), (Budget(rounds=15), 15),
                           (Budget(rounds=3, seconds=1e9, max_rounds=50), 50)):
        timing = interleave(fns, one_call(cpu, budget, clock=machine), budget, clock=machine)
        assert len(timing.rounds) == rounds and len(timing.stats("a")) == 3


def test_interleaved_ratios_are_stable_while_the_machine_drifts():
    """Catches ratios taken across different machine conditions: here the machine slows down
    about twofold during the run; timed one after the other, B / A is off by more than 30%,
    timed in alternation it is within 1% of B's true cost over A's."""
    cpu = torch.device("cpu")
    budget = Budget(rounds=50)
    machine = _DriftingMachine(drift=4.0)
    a, b = machine.provider(1e-3), machine.provider(3e-3)
    sequential = (bench(b, cpu, budget, clock=machine)[0] / bench(a, cpu, budget, clock=machine)[0])
    assert abs(sequential / 3 - 1) > 0.3  # the drift is strong enough to matter
    machine.now = 0.0
    timing = interleave({"A": a, "B": b}, one_call(cpu, budget, clock=machine), budget, clock=machine)
    ratio, low, high = timing.ratio("B", "A")
    assert abs(ratio / 3 - 1) < 0.01 and abs(low / 3 - 1) < 0.02 and abs(high / 3 - 1) < 0.02
    assert 2.5 < timing.stats("B")[0] / timing.stats("A")[0] < 3.5  # per-provider medians are still reported


def test_a_provider_that_fails_mid_measurement_leaves_and_the_others_go_on():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("provider exploded")

    machine = _DriftingMachine(drift=0.0)
    budget = Budget(rounds=6)
    timing = interleave({"ok": machine.provider(1e-3), "flaky": flaky}, one_call(torch.device("cpu"), budget,
                        clock=machine), budget, clock=machine)
    assert timing.names() == ["ok"] and len(timing.rounds) == 6 and "flaky" in timing.errors
    assert timing.ratio("ok", "flaky") is None


def test_cuda_quantiles_come_from_do_bench_samples(monkeypatch):
    """On CUDA each round is one do_bench call returning every run's time; the quantiles are
    order statistics of those runs, pooled over the rounds (never do_bench's interpolation)."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None, return_mode="mean"):
        assert quantiles is None and return_mode == "all" and grad_to_none is grads
        calls.append(rep)
        return [0.5 + len(calls), 0.1 * len(calls), 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    grads = [torch.zeros(1, requires_grad=True)]
    median, p20, p80 = bench(lambda: None, torch.device("cuda"), Budget(rounds=4, round_ms=7), grad_to_none=grads)
    samples = [t / 1e3 for i in range(1, 5) for t in (0.5 + i, 0.1 * i, 3.0)]
    assert calls == [7] * 4
    assert p20 in samples and p80 in samples and min(samples) <= p20 <= median <= p80 <= max(samples)


def test_time_plots_need_two_token_counts(tmp_path):
    """Catches a line plot through a single point: one token count gives a bar chart."""
    pytest.importorskip("matplotlib")
    from benchmarks.report import write_plots

    layer = dict(benchmark="layer", mode="full", N=32, r=16, dropout=0.1, metric="time", unit="s")
    records = [dict(layer, provider=p, K=K, M=M, value=v) for p, v in (("floor", 1e-3), ("lorakernels", 2e-3))
               for K, M in ((32, 64), (48, 64), (48, 128))]
    written = write_plots(records, dict(device="d"), tmp_path)
    assert sorted(p.name for p in written) == ["time_K32_M64.png", "time_vs_tokens_K48.png"]


def test_default_output_dir_is_ignored_by_git():
    """Catches a default run that rewrites the committed results (and dirties the checkout)."""
    from benchmarks.suite import default_output_dir

    if shutil.which("git") is None or subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    for protocol in ("cpu", "gpu"):
        target = default_output_dir(protocol) / "results.csv"
        assert target.parent != REPO / "benchmarks" / "results" / protocol
        assert subprocess.run(["git", "-C", REPO, "check-ignore", "-q", target]).returncode == 0, target


def test_a_run_without_output_dir_writes_to_the_default(tmp_path, monkeypatch):
    from benchmarks import suite

    monkeypatch.setattr(suite, "default_output_dir", lambda protocol: tmp_path / protocol)
    assert suite.main(["--device", DEVICE.type, "--skip-model", "--no-progress", "--providers", "floor",
                       "--layer-shapes", "16,32,24,4,0.0", "--repeats", "1", "--seconds", "0"]) == 0
    assert (tmp_path / ("gpu" if DEVICE.type == "cuda" else "cpu") / "results.csv").exists()


@pytest.mark.parametrize("path", sorted(REPO.glob("benchmarks/results/*/results.csv")), ids=lambda p: p.parent.name)
def test_committed_results_have_sound_quantiles(path):
    """Catches committed timings with percentiles outside their samples (negative ones included)."""
    rows = [r for r in csv.DictReader(open(path)) if r["p20"]]
    assert rows
    for r in rows:
        assert 0 <= float(r["p20"]) <= float(r["value"]) <= float(r["p80"]), r


def test_triton_requirement_is_the_tested_range():
    """Catches an install resolving to a Triton the README never tested (3.6 and 3.9 are)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    triton = next(d for d in deps if d.name == "triton")
    assert triton.specifier.contains("3.6.0") and triton.specifier.contains("3.9.0")
    assert not triton.specifier.contains("3.10.0")


def test_mixed_batch_providers_compute_the_same_function():
    """The three mixed-batch providers (fused, PEFT's adapter_names loop, one adapter at a time) give
    the reference's outputs: each sequence through its own adapter. Would catch a baseline timed on
    the wrong adapters or in the wrong row order."""
    from benchmarks.bench_segmented import make_segmented_providers
    from lorakernels import lora_linear_segmented_ref

    providers, names = make_segmented_providers(32, 24, 4, 3, torch.float32, DEVICE, sequences=5)
    assert names == ["default", "a1", "a2", "default", "a1"]
    layer = providers["lorakernels"].module.layer
    adapters = [layer.adapter_operands(n)[:3] for n in layer.adapter_names]
    x = torch.randn(5, 3, 32)
    index = torch.tensor([layer.adapter_names.index(n) for n in names]).repeat_interleave(3).reshape(5, 3)
    expected = lora_linear_segmented_ref(x, layer.weight, layer.bias, adapters, index)
    assert (expected - torch.nn.functional.linear(x, layer.weight, layer.bias)).abs().max() > 1e-3
    for name, provider in providers.items():
        torch.testing.assert_close(provider.module(x), expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_graphed_overhead_times_the_replays(tmp_path):
    """Each provider's forward + backward captured in a CUDA graph and replayed: a time per provider
    (a capture that fails would leave it out), shown in the host-overhead table."""
    from benchmarks.bench_layer import graphed_benchmarks
    from benchmarks.harness import Budget
    from benchmarks.report import write_markdown

    failures = []
    records = graphed_benchmarks(DEVICE, (16, 64, 64, 16, 0.1), torch.bfloat16,
                                 ["floor", "lorakernels", "peft", "peft-patched"], Budget(rounds=2), 5,
                                 failures=failures)
    assert not failures, failures
    timed = {r["provider"] for r in records if r["metric"] == "time" and r["mode"] == "full-graphed"}
    assert {"floor", "lorakernels"} <= timed
    env = dict(protocol="test", device="d", torch="t", triton="t", timestamp="now", note="n")
    write_markdown([dict(r, benchmark="overhead") for r in records], env, tmp_path / "results.md")
    assert "fwd + bwd in a CUDA graph" in (tmp_path / "results.md").read_text()
