"""Several-adapter tables built from a per-sequence list are built once and reused (every layer of
a model call shares them), and never reused where they would be wrong: another layout, other
ranks or scalings, another device. Catches a table rebuilt (and copied to the device) per layer,
and a stale table routing rows to the wrong adapter."""

import torch

from lorakernels import functional, lora_linear_segmented
from lorakernels.reference import lora_linear_segmented_ref
from tests.utils import DEVICE


def _adapters(ranks, scales, K=24, N=20):
    return [(torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True), s)
            for r, s in zip(ranks, scales)]


def _tables_used(monkeypatch):
    """The Segments tensors every fused call receives."""
    seen = []
    original = functional._fused

    def spy(x, weight, bias, lora_A, lora_B, scaling, p, backend, base_gemm, segments=None, parts=None):
        seen.append(segments)
        return original(x, weight, bias, lora_A, lora_B, scaling, p, backend, base_gemm, segments, parts)

    monkeypatch.setattr(functional, "_fused", spy)
    return seen


def test_a_layout_is_built_once_and_shared_by_every_layer(monkeypatch):
    monkeypatch.setattr(functional, "_TABLES", functional.collections.OrderedDict())
    seen = _tables_used(monkeypatch)
    x = torch.randn(4, 5, 24)
    weight = torch.randn(20, 24)
    adapters = _adapters((4, 8), (0.5, 2.0))
    layout = [1, -1, 0, 1]
    for _ in range(3):  # three layers (or calls) with one layout
        y = lora_linear_segmented(x, weight, None, adapters, layout, backend="torch")
    first = seen[0]
    assert all(s.row_segment is first.row_segment and s.rank_start is first.rank_start and s.scale is first.scale
               for s in seen)
    index = torch.tensor(layout).repeat_interleave(5)
    expected = lora_linear_segmented_ref(x, weight, None, adapters, index)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_another_layout_or_adapter_set_gets_its_own_tables(monkeypatch):
    monkeypatch.setattr(functional, "_TABLES", functional.collections.OrderedDict())
    seen = _tables_used(monkeypatch)
    x = torch.randn(4, 5, 24)
    weight = torch.randn(20, 24)
    calls = [((4, 8), (0.5, 2.0), [1, -1, 0, 1]),
             ((4, 8), (0.5, 2.0), [0, -1, 1, 1]),  # another layout
             ((4, 16), (0.5, 2.0), [1, -1, 0, 1]),  # another rank
             ((4, 8), (0.5, 3.0), [1, -1, 0, 1])]  # another scaling
    for ranks, scales, layout in calls:
        adapters = _adapters(ranks, scales)
        y = lora_linear_segmented(x, weight, None, adapters, layout, backend="torch")
        index = torch.tensor(layout).repeat_interleave(5)
        torch.testing.assert_close(y, lora_linear_segmented_ref(x, weight, None, adapters, index),
                                   rtol=1e-5, atol=1e-5)
    kinds = [key[0] for key in functional._TABLES]
    assert kinds.count("rows") == 2  # one row index per layout ...
    assert kinds.count("segments") == 4  # ... and segment tables per (layout, ranks, scalings)
    assert len({(id(s.row_segment), id(s.rank_start), id(s.scale)) for s in seen}) == 4


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(functional, "_TABLES", functional.collections.OrderedDict())
    monkeypatch.setattr(functional, "TABLES_KEPT", 3)
    x = torch.randn(6, 2, 24)
    weight = torch.randn(20, 24)
    adapters = _adapters((4,), (1.0,))
    for n in range(6):
        layout = [0] * n + [-1] * (6 - n)
        lora_linear_segmented(x, weight, None, adapters, layout, backend="torch")
    assert len(functional._TABLES) == 3
    assert all(t.device.type == DEVICE.type for tables in functional._TABLES.values()
               for t in (tables if isinstance(tables, tuple) else (tables,)))  # on x's device
