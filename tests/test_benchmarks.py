"""Benchmark smoke tests: every provider computes what it claims (so a benchmark never times a
broken baseline), and the suite's output files parse. Seconds, on the suite's device."""

import csv
import json

import pytest
import torch

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


def test_dropout_providers_apply_dropout_in_training_only():
    """With dropout, LoRA providers' training-mode output differs from their eval-mode output."""
    providers = make_providers(64, 32, 4, torch.float32, 0.5, DEVICE, names=["lorakernels", "unfused"])
    x = torch.randn(256, 64)
    for provider in providers.values():
        lora = provider.module
        lora.train()
        y_train = lora(x)
        lora.eval()
        y_eval = lora(x)
        assert not torch.allclose(y_train, y_eval)


def test_suite_writes_parseable_results(tmp_path):
    from benchmarks import suite

    protocol = dict(suite.PROTOCOLS["cpu"], layer_shapes=[(16, 32, 24, 4, 0.1)], merge=[(32, 24, 4)],
                    model=dict(size=dict(vocab=50, hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1),
                               batch=1, seq=8, inference=[(1, 8)]), repeats=1, overhead_repeats=1)
    suite.PROTOCOLS["test"] = protocol
    try:
        assert suite.main(["--device", DEVICE.type, "--protocol", "test", "--output-dir", str(tmp_path),
                           "--no-progress"]) == 0
    finally:
        del suite.PROTOCOLS["test"]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(data["records"]) > 0
    assert {"layer", "overhead", "merge", "model"} <= {r["benchmark"] for r in rows}
    assert all(float(r["value"]) >= 0 for r in rows)
    providers = {r["provider"] for r in rows if r["benchmark"] == "layer"}
    assert {"floor", "lorakernels", "unfused", "full-ft", "adapter"} <= providers
    text = (tmp_path / "results.md").read_text()
    assert "x floor" in text and "## Host overhead" in text
    assert ("CPU timings, lorakernels on its torch backend" in text) == (DEVICE.type == "cpu")


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
    status = suite.main(["--device", DEVICE.type, "--skip-model", "--no-progress", "--output-dir", str(tmp_path),
                         "--providers", "floor", "lorakernels", "--layer-shapes", "16,32,24,4,0.1", "--repeats", "1"])
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

    records = gemm_benchmark(DEVICE, 64, 48, 32, torch.float32, repeats=1)
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

    monkeypatch.setattr(suite, "model_benchmarks", killed)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--device", DEVICE.type, "--no-progress", "--output-dir", str(tmp_path), "--providers", "floor",
                    "--layer-shapes", "16,32,24,4,0.0", "--repeats", "1"])
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
