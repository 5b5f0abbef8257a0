"""results.md and PNG plots, made from the long-format records of one run."""

from collections import defaultdict
from typing import NamedTuple, Optional

LAYER_MODES = ("full", "forward", "backward", "inference-merged")


class Shape(NamedTuple):
    """A layer shape: tokens, in and out features, rank, dropout."""

    M: int
    K: int
    N: int
    r: int
    dropout: Optional[float]


class RecordKey(NamedTuple):
    """What one measurement is of: a provider, a mode and a layer shape."""

    provider: str
    mode: str
    M: int
    K: int
    N: int
    r: int
    dropout: Optional[float]

    @classmethod
    def of(cls, record):
        return cls(*(record[field] for field in cls._fields))

    @classmethod
    def at(cls, provider, mode, shape):
        return cls(provider, mode, *shape)

    @property
    def shape(self):
        return Shape(self.M, self.K, self.N, self.r, self.dropout)


def _fmt_time(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _index(records, benchmark, metric):
    """{RecordKey: record} for one benchmark and metric (a later duplicate replaces an earlier one)."""
    return {RecordKey.of(r): r for r in records if r["benchmark"] == benchmark and r["metric"] == metric}


def _ratios(records, benchmark):
    """{(RecordKey, reference provider): record} of the per-round ratios (metric ratio_to_<reference>)."""
    return {(RecordKey.of(r), r["metric"][len("ratio_to_"):]): r for r in records
            if r["benchmark"] == benchmark and r["metric"].startswith("ratio_to_")}


def _ratio(rec, ref, ratios=None):
    """rec's time over ref's: the median of the per-round ratios when the two were timed in
    alternation (a `ratios` entry), else the ratio of the two medians; "-" without ref."""
    if not ref:
        return "-"
    per_round = (ratios or {}).get((RecordKey.of(rec), ref["provider"]))
    return f"{per_round['value'] if per_round else rec['value'] / ref['value']:.2f}"


def write_markdown(records, env, path, failures=()):
    sections = (_header(env), _failures_section(failures), _layer_sections(records), _overhead_section(records),
                _kernels_section(records), _gemm_section(records), _layer_memory_section(records), _merge_section(records),
                _model_section(records), _segmented_section(records), _qlora_layer_sections(records),
                _qlora_memory_section(records), _qlora_model_section(records))
    path.write_text("\n".join(line for section in sections for line in section))


def _header(env):
    return [f"# Benchmark results ({env['protocol']} protocol)", "",
            f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; {env['timestamp']}.",
            f"**{env['note']}.**", "",
            f"Timings are medians of every sample (budget per measurement: {_budget_text(env)}). The providers "
            "of a table are timed in alternation: each round times every provider once, in an order rotated "
            "from round to round. `x floor` (time over the frozen layer alone: F.linear + its dX GEMM), "
            "`x unfused` (over plain-PyTorch LoRA) and `x peft` (over a PEFT LoRA layer) are the medians over "
            "the rounds of the ratio within each round, so both sides of a ratio share the machine's "
            "conditions; they need not equal the ratio of the two medians shown. The CSV also has each "
            "median's 20/80th percentiles, order statistics of the samples.", ""]


def _budget_text(env):
    b = env.get("budget")
    if not b:
        return "not recorded"
    text = f"at least {b['rounds']} rounds"
    text += f" and {b['seconds']:g} s" if b["seconds"] else ""
    return text + (f"; on CUDA one do_bench call of {b['round_ms']:g} ms per provider and round"
                   if env.get("device_type") == "cuda" else "")


def _failures_section(failures):
    if not failures:
        return []
    return ["## FAILED measurements", "", "| section | what | error |", "|---|---|---|",
            *(f"| {f['section']} | {f['what']} | {f['error'].splitlines()[0][:200]} |" for f in failures), ""]


def _timing_tables(records, benchmark, title, modes, references, intro=()):
    """One table per mode: each provider's median time at each shape and its ratios to the
    `references` (per round where they were timed in alternation). `intro` goes under the first
    table's title."""
    times, ratios = _index(records, benchmark, "time"), _ratios(records, benchmark)
    shapes = sorted({key.shape for key in times}, key=lambda s: (s.K, s.M, s.r, -(s.dropout or 0)))
    lines = []
    for mode in modes:
        rows = []
        for shape in shapes:
            refs = [times.get(RecordKey.at(name, mode, shape)) for name in references]
            rows += [f"| {shape.M} | {shape.K} | {shape.r} | {shape.dropout} | {key.provider} | "
                     f"{_fmt_time(rec['value'])} | " + " | ".join(_ratio(rec, ref, ratios) for ref in refs) + " |"
                     for key, rec in times.items() if key.mode == mode and key.shape == shape]
        if rows:
            lines += [f"## {title}, {mode}", "", *([] if lines else intro),
                      "| tokens | K=N | r | p | provider | time | " + " | ".join(f"x {n}" for n in references) + " |",
                      "|" + "---|" * (6 + len(references)), *rows, ""]
    return lines


def _layer_sections(records):
    """One table per mode: each provider's median time and its ratios to the floor, unfused and PEFT."""
    return _timing_tables(records, "layer", "Layer", LAYER_MODES, ("floor", "unfused", "peft"))


def _overhead_section(records):
    overhead = _index(records, "overhead", "time")
    if not overhead:
        return []
    shape = next(iter(overhead)).shape
    lines = ["## Host overhead", "",
             f"A layer of {shape.M} tokens, K = N = {shape.K}, r = {shape.r}, p = {shape.dropout}, called back to "
             "back and timed by the host clock (device synchronized around each batch): the kernels' work is "
             "negligible, so these times are the per-call cost of Python, autograd and kernel launches, "
             "which bounds any layer whose kernels take less.", "",
             "| provider | forward | backward | forward + backward | x floor (fwd + bwd) | fwd + bwd in a CUDA graph |",
             "|---|---|---|---|---|---|"]
    floor, ratios = overhead.get(RecordKey.at("floor", "full", shape)), _ratios(records, "overhead")
    for provider in dict.fromkeys(key.provider for key in overhead):
        cells = [overhead.get(RecordKey.at(provider, mode, shape)) for mode in ("forward", "backward", "full")]
        graphed = overhead.get(RecordKey.at(provider, "full-graphed", shape))
        lines.append(f"| {provider} | " + " | ".join(_fmt_time(c["value"]) if c else "-" for c in cells) +
                     f" | {_ratio(cells[2], floor, ratios) if cells[2] else '-'} | "
                     f"{_fmt_time(graphed['value']) if graphed else '-'} |")
    lines.append("")
    return lines


def _kernels_section(records):
    rows = [r for r in records if r["benchmark"] == "kernels"]
    if not rows:
        return []
    from benchmarks.bench_kernels import table

    return ["## Kernel passes against their bounds", "",
            "Each pass of the fused layer timed alone (bf16 activations, rank 16): F1, B1 and B3 against one pass "
            "over the bytes they must move at the copy bandwidth measured in the same run, F2 and B2 against cuBLAS "
            "on the same frozen GEMM; `auto ran` is what base_gemm='auto' chose (benchmarks/bench_kernels.py).", "",
            *table(rows), ""]


def _gemm_section(records):
    gemm, ratios = _index(records, "gemm", "time"), _ratios(records, "gemm")
    if not gemm:
        return []
    lines = ["## The fused kernels' GEMM main loop against cuBLAS", "",
             "F2 (X W^T + b) and B2 (dY W) with the LoRA term switched off, against torch.addmm / torch.mm "
             "on the same operands. The fusion pays only where this ratio is near 1.", "",
             "| tokens | K=N | GEMM | Triton kernel | Triton | cuBLAS | Triton / cuBLAS |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(gemm, key=lambda k: (k.K, k.M, k.mode, k.provider)):
        if key.provider == "cublas":
            continue
        rec, cublas = gemm[key], gemm.get(key._replace(provider="cublas"))
        lines.append(f"| {key.M} | {key.K} | {key.mode} | {key.provider} | {_fmt_time(rec['value'])} | "
                     f"{_fmt_time(cublas['value']) if cublas else '-'} | {_ratio(rec, cublas, ratios)} |")
    lines.append("")
    return lines


def _layer_memory_section(records):
    saved = _index(records, "layer", "saved_bytes")
    if not saved:
        return []
    params = _index(records, "layer", "trainable_params")
    memory = _index(records, "layer", "peak_memory")
    lines = ["## Layer memory", "", "| tokens | K=N | r | p | provider | saved for backward | trainable params | "
             "peak memory (full step) |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(saved, key=lambda k: (k.K, k.M, k.r, str(k.dropout), k.provider)):
        peak = memory.get(key)
        peak_text = f"{peak['value'] / 2**20:.1f} MiB" if peak else "-"
        lines.append(f"| {key.M} | {key.K} | {key.r} | {key.dropout} | {key.provider} | "
                     f"{saved[key]['value'] / 2**20:.2f} MiB | {params[key]['value']:,} | {peak_text} |")
    lines.append("")
    return lines


def _merge_section(records):
    merge = [r for r in records if r["benchmark"] == "merge" and r["metric"] == "bandwidth"]
    if not merge:
        return []
    return ["## Merge (W + s B A) against a device-to-device copy", "", "| N x K | r | provider | GB/s |",
            "|---|---|---|---|", *(f"| {r['N']} x {r['K']} | {r['r']} | {r['provider']} | {r['value']:.1f} |"
                                   for r in merge), ""]


def _model_section(records):
    model = defaultdict(dict)  # (provider, mode) -> {metric: record}
    for r in records:
        if r["benchmark"] == "model":
            model[(r["provider"], r["mode"])][r["metric"]] = r
    if not model:
        return []
    lines = ["## Model (Llama-style decoder)", "",
             "One training step (forward, backward, AdamW step) and inference. Weights and AdamW state in "
             "the model's dtype (no fp32 master copy); LoRA adapters in fp32 as PEFT keeps them. Peak memory "
             "is everything allocated during the step: weights, gradients, optimizer state, activations. "
             "`x ref`: the median over rounds of the per-round time ratio to the first variant (training) "
             "or to the base model (inference).", "",
             "| provider | mode | time | x ref | tokens/s | trainable params | peak memory incl. optimizer |",
             "|---|---|---|---|---|---|---|"]
    for (provider, mode), metrics in model.items():
        ratio = next((f"{rec['value']:.2f} x {metric[len('ratio_to_'):]}" for metric, rec in metrics.items()
                      if metric.startswith("ratio_to_")), "-")
        tps = metrics.get("tokens_per_s")
        prm = metrics.get("trainable_params")
        mem = metrics.get("peak_memory_incl_optimizer")
        tps_text = f"{tps['value']:,.0f}" if tps else "-"
        prm_text = f"{prm['value']:,}" if prm else "-"
        mem_text = f"{mem['value'] / 2**20:.0f} MiB" if mem else "-"
        lines.append(f"| {provider} | {mode} | {_fmt_time(metrics['time']['value'])} | {ratio} | {tps_text} | "
                     f"{prm_text} | {mem_text} |")
    lines.append("")
    return lines


def _segmented_section(records):
    """Mixed batches: per adapter count and provider, tokens/s of the forward (autograd recording) and
    of forward + backward, the per-round ratio to PEFT, saved bytes, peak memory."""
    cells = defaultdict(dict)  # (adapters, provider) -> {(metric, mode): record}
    for r in records:
        if r["benchmark"] == "segmented":
            cells[(r["adapters"], r["provider"])][(r["metric"], r["mode"])] = r
    if not cells:
        return []
    first = next(r for r in records if r["benchmark"] == "segmented")
    lines = ["## Several adapters in one batch", "",
             f"{first['M']} tokens in sequences assigned round-robin to the adapters, K = N = {first['K']}, rank "
             f"{first['r']} each, dropout 0. `lorakernels`: one fused pass (`adapter_names=`); `peft`: PEFT's "
             "lora.Linear with the same adapters and `adapter_names=` (its loop over adapters); `one-at-a-time`: "
             "each adapter's sequences as their own batch. Forward: with autograd recording, as in training. "
             "`x peft`: per-round time ratio (lower is faster).", "",
             "| adapters | provider | forward tok/s | x peft | forward + backward tok/s | x peft | saved for backward "
             "| peak memory |", "|---|---|---|---|---|---|---|---|"]
    for (adapters, provider), m in sorted(cells.items()):
        row = [str(adapters), provider]
        for mode in ("forward", "full"):
            tps, ratio = m.get(("tokens_per_s", mode)), m.get(("ratio_to_peft", mode))
            row += [f"{tps['value']:,.0f}" if tps else "-", f"{ratio['value']:.2f}" if ratio else "-"]
        saved, peak = m.get(("saved_bytes", "full")), m.get(("peak_memory", "full"))
        row += [f"{saved['value'] / 2**20:.2f} MiB" if saved else "-",
                f"{peak['value'] / 2**20:.1f} MiB" if peak else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


QLORA_INTRO = ("LoRA over an NF4 base (bitsandbytes, double quantization, bf16 compute), on one 4-bit weight: "
               "`lorakernels` (the kernels dequantize W's tiles in registers), `peft` (PEFT's QLoRA layer: "
               "bitsandbytes' dequantize + matmul, then the LoRA path), `peft-patched` (that layer after "
               "`patch_peft`), `dequant-cublas` (Unsloth's method: W dequantized into one reused buffer, cuBLAS, "
               "dequantized again in backward; dropout 0 only), `bnb-frozen` (the Linear4bit alone).")


def _qlora_layer_sections(records):
    """One table per mode: each QLoRA provider's median time and its ratios to PEFT and dequant-cublas."""
    return _timing_tables(records, "qlora-layer", "QLoRA layer", ("full", "forward", "backward"),
                          ("peft", "dequant-cublas"), intro=(QLORA_INTRO, ""))


def _qlora_memory_section(records):
    saved = _index(records, "qlora-layer", "saved_bytes")
    if not saved:
        return []
    weight, dense = _index(records, "qlora-layer", "weight_bytes"), _index(records, "qlora-layer", "weight_bytes_bf16")
    params, memory = _index(records, "qlora-layer", "trainable_params"), _index(records, "qlora-layer", "peak_memory")
    lines = ["## QLoRA layer memory", "",
             "Weight bytes: the 4-bit codes with their quantization state (dequant-cublas adds its dense "
             "buffer, which a model shares between its layers); `x bf16`: over the same weight in bf16.", "",
             "| tokens | K=N | r | p | provider | saved for backward | x peft | weight | x bf16 | trainable params "
             "| peak memory (full step) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(saved, key=lambda k: (k.K, k.M, k.r, str(k.dropout), k.provider)):
        peft = saved.get(key._replace(provider="peft"))
        peft_text = f"{saved[key]['value'] / peft['value']:.2f}" if peft and peft["value"] else "-"
        w, d, peak = weight.get(key), dense.get(key), memory.get(key)
        weight_text = f"{w['value'] / 2**20:.2f} MiB | {w['value'] / d['value']:.3f}" if w and d else "- | -"
        peak_text = f"{peak['value'] / 2**20:.1f} MiB" if peak else "-"
        prm = params.get(key)
        prm_text = f"{prm['value']:,}" if prm else "-"
        lines.append(f"| {key.M} | {key.K} | {key.r} | {key.dropout} | {key.provider} | "
                     f"{saved[key]['value'] / 2**20:.3f} MiB | {peft_text} | {weight_text} | {prm_text} | "
                     f"{peak_text} |")
    lines.append("")
    return lines


def _qlora_model_section(records):
    model = defaultdict(dict)  # provider -> {metric: record}
    for r in records:
        if r["benchmark"] == "qlora-model":
            model[r["provider"]][r["metric"]] = r
    if not model:
        return []
    first = next(iter(model.values()))["time"]
    lines = [f"## QLoRA model (Llama-style decoder, decoder Linear layers in NF4, {first['M']} tokens per step)", "",
             "One training step (forward, backward, AdamW on the fp32 adapters), rank 16 on the attention and MLP "
             "projections, dropout 0. Weight bytes: parameters and buffers, the 4-bit weights with their "
             "quantization state. Saved: what one training forward keeps for backward. Peak memory (CUDA): "
             "everything allocated during the step.", "",
             "| provider | time | x ref | tokens/s | saved for backward | weights | peak memory incl. optimizer |",
             "|---|---|---|---|---|---|---|"]
    for provider, metrics in model.items():
        ratio = next((f"{rec['value']:.2f} x {metric[len('ratio_to_'):]}" for metric, rec in metrics.items()
                      if metric.startswith("ratio_to_")), "-")
        cells = [metrics.get(m) for m in ("tokens_per_s", "saved_bytes", "weight_bytes", "peak_memory_incl_optimizer")]
        tps, saved, weight, peak = (c["value"] if c else None for c in cells)
        lines.append(f"| {provider} | {_fmt_time(metrics['time']['value'])} | {ratio} | "
                     + (f"{tps:,.0f}" if tps else "-") + " | "
                     + " | ".join(f"{v / 2**20:.1f} MiB" if v else "-" for v in (saved, weight, peak)) + " |")
    lines.append("")
    return lines


def summary(records, note):
    """A few lines for the end of a run's output, under a heading that says what the timings are
    (`note`: the environment's, e.g. that CPU timings are the torch backend's, not GPU speed): per
    layer shape, lorakernels' forward + backward time against the floor and PEFT; the Triton GEMM
    against cuBLAS; the model's tokens/s."""
    return [f"summary ({note}):"] + _layer_summary(records) + _gemm_summary(records) + _model_summary(records)


def _layer_summary(records):
    lines = []
    times, ratios = _index(records, "layer", "time"), _ratios(records, "layer")
    for key, rec in times.items():
        if key.provider == "lorakernels" and key.mode == "full":
            refs = {name: times.get(key._replace(provider=name))
                    for name in ("floor", "peft", "lorakernels-cublas", "lorakernels-tma")}
            lines.append(f"layer M={key.M} K={key.K} r={key.r} p={key.dropout}: {_fmt_time(rec['value'])}, "
                         + ", ".join(f"x {name} {_ratio(rec, ref, ratios)}" for name, ref in refs.items() if ref))
    return lines


def _gemm_summary(records):
    gemm, ratios = _index(records, "gemm", "time"), _ratios(records, "gemm")
    return [f"gemm {key.mode} M={key.M} K={key.K}: {key.provider} / cublas "
            f"{_ratio(rec, gemm.get(key._replace(provider='cublas')), ratios)}"
            for key, rec in gemm.items() if key.provider != "cublas"]


def _model_summary(records):
    return [f"model {r['provider']}: {r['value']:,.0f} tokens/s" for r in records
            if r["benchmark"] == "model" and r["metric"] == "tokens_per_s"]


def write_plots(records, env, out_dir):
    """Time per provider (full step, r = 16, p > 0, per K): against tokens where the run has two
    token counts or more for that K, else a bar chart at the one token count; saved bytes, peak
    memory (CUDA) and the model's peak memory (CUDA) per provider. [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = _time_plots(plt, records, env, out_dir)
    for metric, ylabel, name in (("saved_bytes", "MiB saved for backward", "saved_bytes.png"),
                                 ("peak_memory", "peak MiB of a training step (CUDA)", "peak_memory.png")):
        rows = [r for r in records if r["benchmark"] == "layer" and r["metric"] == metric]
        if not rows:
            continue
        top = max(rows, key=lambda r: (r["M"] * r["K"], r["dropout"] or 0))
        sel = [r for r in rows if (r["M"], r["K"], r["r"], r["dropout"]) == (top["M"], top["K"], top["r"],
                                                                            top["dropout"])]
        written.append(_bar(plt, [r["provider"] for r in sel], [r["value"] / 2**20 for r in sel], ylabel,
                            f"tokens {top['M']}, K = N = {top['K']}, r = {top['r']}, p = {top['dropout']}",
                            out_dir / name))
    model = [r for r in records if r["benchmark"] == "model" and r["metric"] == "peak_memory_incl_optimizer"]
    if model:
        written.append(_bar(plt, [r["provider"] for r in model], [r["value"] / 2**30 for r in model],
                            "peak GiB incl. optimizer state", f"Llama-style model, {model[0]['M']} tokens per step",
                            out_dir / "model_peak_memory.png"))
    return written


def _time_plots(plt, records, env, out_dir):
    """Per K: time_vs_tokens_K<K>.png (a line per provider) with two token counts or more, else
    time_K<K>_M<M>.png (a bar per provider): a line through one point shows nothing."""
    times = [r for r in records if r["benchmark"] == "layer" and r["metric"] == "time" and r["mode"] == "full"
             and r["r"] == 16 and r["dropout"]]
    written = []
    for K in sorted({r["K"] for r in times}):
        at_k = [r for r in times if r["K"] == K]
        tokens = sorted({r["M"] for r in at_k})
        title = f"K = N = {K}, r = 16, p > 0 ({env['device']})"
        if len(tokens) == 1:
            at_k.sort(key=lambda r: r["dropout"])  # one bar per provider: the largest p at this M
            bars = {r["provider"]: r["value"] * 1e3 for r in at_k}
            written.append(_bar(plt, list(bars), list(bars.values()), "ms (forward + backward)",
                                f"{tokens[0]} tokens, {title}", out_dir / f"time_K{K}_M{tokens[0]}.png"))
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in sorted({r["provider"] for r in at_k}):
            pts = sorted((r["M"], r["value"] * 1e3) for r in at_k if r["provider"] == provider)
            ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set(xlabel="tokens", ylabel="ms (forward + backward)", title=title)
        ax.legend(fontsize=7)
        path = out_dir / f"time_vs_tokens_K{K}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _bar(plt, labels, values, ylabel, title, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, values)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
