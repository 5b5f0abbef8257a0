"""The per-kernel benchmark runs every pass of a layer and writes its table: catches a pass the
script no longer reaches (a renamed host function), a missing bound, or a broken report."""

import json

import torch

from benchmarks.bench_kernels import kernel_benchmarks, write
from benchmarks.harness import Budget, environment
from tests.utils import DEVICE


def test_every_pass_is_timed_against_its_bound(tmp_path):
    records, bandwidth = kernel_benchmarks(DEVICE, [(40, 32, 48)], r=4, dropouts=(0.1,),
                                           adapter_dtypes=(torch.float32,), budget=Budget(rounds=1))
    assert bandwidth > 0
    assert [r["provider"] for r in records] == ["F1", "F2", "F2 auto", "B1", "B2", "B2 auto", "B3"]
    assert all(r["value"] > 0 and r["bound_seconds"] > 0 and r["ratio"] == r["value"] / r["bound_seconds"]
               for r in records)
    assert {r["bound"] for r in records if r["provider"].startswith(("F2", "B2"))} == {"cuBLAS"}
    assert all(r["chosen"] in ("triton", "cublas", "triton-tma") for r in records if r["provider"].endswith("auto"))
    write(records, bandwidth, environment(DEVICE), tmp_path)
    assert "| 40 | 32 | 48 | float32 | 0.1 | B3 |" in (tmp_path / "kernels.md").read_text()
    assert len(json.loads((tmp_path / "kernels.json").read_text())["records"]) == len(records)


def test_large_ranks_time_the_separate_db_pass():
    records, _ = kernel_benchmarks(DEVICE, [(40, 32, 48)], r=64, dropouts=(0.0,), adapter_dtypes=(torch.float32,),
                                   budget=Budget(rounds=1))
    assert "B3 dB" in [r["provider"] for r in records]
