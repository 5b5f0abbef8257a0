"""Mixed batches over several adapters: each sequence of a batch through its own adapter, three ways,
on one frozen base and the same adapter values.

    lorakernels     LoRALinear.forward(x, adapter_names=...): one fused pass (lora_linear_segmented)
    peft            PEFT's lora.Linear with the same adapters, forward(x, adapter_names=...): the base
                    GEMM once, then PEFT's loop over the adapters on their sub-batches
    one-at-a-time   lorakernels, each adapter's sequences run as their own batch (set_adapter), the
                    outputs put back in batch order: what a loop over adapters costs

Records are tagged benchmark "segmented" with an `adapters` field (1, 4, 16 adapters, sequences
assigned round-robin): forward (autograd recording, as in training), backward and forward + backward
times with ratios to peft, tokens per second, saved bytes and peak memory (CUDA).
"""

import torch
from torch import nn

from benchmarks.bench_layer import _shape_benchmarks, failure
from benchmarks.harness import QUIET, one_call
from benchmarks.providers import Provider
from benchmarks.providers import _peft_layer
from lorakernels import LoRALinear

SEGMENTED_PROVIDERS = ("lorakernels", "peft", "one-at-a-time")


class MixedBatch(nn.Module):
    """Calls `layer(x, adapter_names=names)`: a mixed batch as the benchmark harness calls modules."""

    def __init__(self, layer, names):
        super().__init__()
        self.layer, self.names = layer, names

    def forward(self, x):
        return self.layer(x, adapter_names=self.names)


class OneAtATime(nn.Module):
    """Each adapter's sequences as their own batch through `layer` (set_adapter), outputs re-ordered."""

    def __init__(self, layer, names):
        super().__init__()
        self.layer, self.names = layer, names
        groups = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        device = layer.weight.device  # built once, where x will be: no copies inside the timed call
        self.groups = {name: torch.tensor(rows, device=device) for name, rows in groups.items()}
        self.order = torch.argsort(torch.cat(list(self.groups.values())))

    def forward(self, x):
        outputs = []
        for name, rows in self.groups.items():
            self.layer.set_adapter(name)
            outputs.append(self.layer(x[rows]))
        return torch.cat(outputs)[self.order]


def adapter_layer(K, N, r, n, dtype, device):
    """A LoRALinear with `n` adapters ("default", "a1", ...) of rank r, lora_B random (as trained)."""
    torch.manual_seed(0)
    layer = LoRALinear(K, N, r=r, lora_alpha=r, device=device, dtype=dtype, adapter_dtype=torch.float32)
    layer.weight.requires_grad_(False)
    for i in range(1, n):
        layer.add_adapter(f"a{i}", r=r, lora_alpha=r)
    with torch.no_grad():
        for name in layer.adapter_names:
            layer.adapter_operands(name)[1].normal_(std=0.02)
    return layer


def _peft_multi_adapter(layer):
    """PEFT's lora.Linear over `layer`'s frozen base with copies of its adapters (same names)."""
    import peft

    model = _peft_layer(layer, layer)  # the layer's own adapter as PEFT's "default"
    theirs = model.base_model.model.layer
    config = dict(r=layer.r, lora_alpha=layer.lora_alpha, lora_dropout=layer.lora_dropout, target_modules=["layer"])
    for name in layer.adapter_names[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
        A, B, _, _ = layer.adapter_operands(name)
        with torch.no_grad():
            theirs.lora_A[name].weight.copy_(A)
            theirs.lora_B[name].weight.copy_(B)
    theirs.requires_grad_(True)
    theirs.base_layer.requires_grad_(False)
    return theirs


def make_segmented_providers(K, N, r, n, dtype, device, sequences, names=None):
    """({name: Provider}, adapter name per sequence) for `n` adapters assigned round-robin."""
    layer = adapter_layer(K, N, r, n, dtype, device)
    per_sequence = [layer.adapter_names[i % n] for i in range(sequences)]
    wanted = set(names or SEGMENTED_PROVIDERS)
    out = {}
    if "lorakernels" in wanted:
        out["lorakernels"] = Provider("lorakernels", MixedBatch(layer, per_sequence), lora=True)
    if "peft" in wanted:
        try:
            out["peft"] = Provider("peft", MixedBatch(_peft_multi_adapter(layer), per_sequence), lora=True)
        except ImportError:
            pass
    if "one-at-a-time" in wanted:
        twin = adapter_layer(K, N, r, n, dtype, device)
        out["one-at-a-time"] = Provider("one-at-a-time", OneAtATime(twin, per_sequence), lora=True)
    return out, per_sequence


def segmented_benchmarks(device, sequences, seq_len, K, N, r, adapter_counts, dtype, budget, failures=None,
                         names=None, progress=QUIET):
    """Each provider at each adapter count: modes timed in alternation, ratios to peft, tokens/s,
    saved bytes, trainable parameters, peak memory (CUDA). `progress`: a line per measurement, a
    step per adapter count."""
    failures = [] if failures is None else failures
    records = []
    for n in adapter_counts:
        try:
            records += _adapter_count(device, sequences, seq_len, K, N, r, n, dtype, budget, failures, names, progress)
        finally:
            progress.step()
    return records


def _adapter_count(device, sequences, seq_len, K, N, r, n, dtype, budget, failures, names, progress):
    M = sequences * seq_len
    shape = (M, K, N, r, 0.0, dtype)
    label = f"{n} adapters, {sequences} sequences of {seq_len} tokens, K={K} N={N} r={r}"
    progress.note(f"{label}: building providers")
    try:
        layers, _ = make_segmented_providers(K, N, r, n, dtype, device, sequences, names)
    except Exception as error:  # noqa: BLE001
        failures.append(failure("segmented", f"providers with {n} adapters", error))
        return []
    x = torch.randn(sequences, seq_len, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(sequences, seq_len, N, device=device, dtype=dtype)
    shape_records = _shape_benchmarks(device, shape, layers, x, dy, budget, one_call(device, budget), failures,
                                      references=("peft",), benchmark="segmented", progress=progress,
                                      label=label)
    records = []
    for rec in shape_records:
        rec["adapters"] = n
        records.append(rec)
        if rec["metric"] == "time":
            records.append(dict(rec, metric="tokens_per_s", value=M / rec["value"], p20=None, p80=None,
                                unit="tok/s"))
    return records
