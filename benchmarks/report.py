"""results.md and PNG plots, made from the long-format records of one run."""

from collections import defaultdict


def _fmt_time(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _index(records, benchmark, metric):
    out = {}
    for r in records:
        if r["benchmark"] == benchmark and r["metric"] == metric:
            out[(r["provider"], r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"])] = r
    return out


def _ratio(rec, ref):
    return f"{rec['value'] / ref['value']:.2f}" if ref else "-"


def write_markdown(records, env, path, failures=()):
    lines = [f"# Benchmark results ({env['protocol']} protocol)", "",
             f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; {env['timestamp']}.",
             f"**{env['note']}.**", "",
             "Layer timings are medians; `x floor` is the ratio to the frozen layer alone (F.linear + its dX "
             "GEMM), `x unfused` to plain-PyTorch LoRA and `x peft` to a PEFT LoRA layer, all measured in the "
             "same run.", ""]
    if failures:
        lines += ["## FAILED measurements", "", "| section | what | error |", "|---|---|---|"]
        lines += [f"| {f['section']} | {f['what']} | {f['error'].splitlines()[0][:200]} |" for f in failures]
        lines.append("")
    times = _index(records, "layer", "time")
    shapes = sorted({k[2:] for k in times}, key=lambda s: (s[1], s[0], s[3], -(s[4] or 0)))
    for mode in ("full", "forward", "backward", "inference-merged"):
        rows = []
        for shape in shapes:
            floor, unfused, peft = (times.get((name, mode) + shape) for name in ("floor", "unfused", "peft"))
            for (provider, m, *rest), rec in times.items():
                if m != mode or tuple(rest) != shape:
                    continue
                rows.append(f"| {shape[0]} | {shape[1]} | {shape[3]} | {shape[4]} | {provider} | "
                            f"{_fmt_time(rec['value'])} | {_ratio(rec, floor)} | {_ratio(rec, unfused)} | "
                            f"{_ratio(rec, peft)} |")
        if rows:
            lines += [f"## Layer, {mode}", "",
                      "| tokens | K=N | r | p | provider | time | x floor | x unfused | x peft |",
                      "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    overhead = _index(records, "overhead", "time")
    if overhead:
        shape = next(iter(overhead))[2:]
        lines += ["## Host overhead", "",
                  f"A layer of {shape[0]} tokens, K = N = {shape[1]}, r = {shape[3]}, p = {shape[4]}, called back to "
                  "back and timed by the host clock (device synchronized around each batch): the kernels' work is "
                  "negligible, so these times are the per-call cost of Python, autograd and kernel launches, "
                  "which bounds any layer whose kernels take less.", "",
                  "| provider | forward | backward | forward + backward | x floor (fwd + bwd) |",
                  "|---|---|---|---|---|"]
        for provider in dict.fromkeys(k[0] for k in overhead):
            cells = [overhead.get((provider, mode) + shape) for mode in ("forward", "backward", "full")]
            floor = overhead.get(("floor", "full") + shape)
            lines.append(f"| {provider} | " + " | ".join(_fmt_time(c["value"]) if c else "-" for c in cells) +
                         f" | {_ratio(cells[2], floor) if cells[2] else '-'} |")
        lines.append("")
    gemm = _index(records, "gemm", "time")
    if gemm:
        lines += ["## The fused kernels' GEMM main loop against cuBLAS", "",
                  "F2 (X W^T + b) and B2 (dY W) with the LoRA term switched off, against torch.addmm / torch.mm "
                  "on the same operands. The fusion pays only where this ratio is near 1.", "",
                  "| tokens | K=N | GEMM | Triton | cuBLAS | Triton / cuBLAS |", "|---|---|---|---|---|---|"]
        for key, rec in sorted(gemm.items(), key=lambda kv: (kv[0][3], kv[0][2], kv[0][1])):
            provider, mode, M, K = key[:4]
            if provider != "triton-gemm":
                continue
            cublas = gemm.get(("cublas",) + key[1:])
            lines.append(f"| {M} | {K} | {mode} | {_fmt_time(rec['value'])} | "
                         f"{_fmt_time(cublas['value']) if cublas else '-'} | {_ratio(rec, cublas)} |")
        lines.append("")
    saved = _index(records, "layer", "saved_bytes")
    params = _index(records, "layer", "trainable_params")
    memory = _index(records, "layer", "peak_memory")
    if saved:
        lines += ["## Layer memory", "", "| tokens | K=N | r | p | provider | saved for backward | trainable params | "
                  "peak memory (full step) |", "|---|---|---|---|---|---|---|---|"]
        for key, rec in sorted(saved.items(), key=lambda kv: (kv[0][3], kv[0][2], kv[0][5], str(kv[0][6]), kv[0][0])):
            peak = memory.get(key)
            lines.append(f"| {key[2]} | {key[3]} | {key[5]} | {key[6]} | {key[0]} | {rec['value'] / 2**20:.2f} MiB | "
                         f"{params[key]['value']:,} | {peak['value'] / 2**20:.1f} MiB |" if peak else
                         f"| {key[2]} | {key[3]} | {key[5]} | {key[6]} | {key[0]} | {rec['value'] / 2**20:.2f} MiB | "
                         f"{params[key]['value']:,} | - |")
        lines.append("")
    merge = [r for r in records if r["benchmark"] == "merge" and r["metric"] == "bandwidth"]
    if merge:
        lines += ["## Merge (W + s B A) against a device-to-device copy", "", "| N x K | r | provider | GB/s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['N']} x {r['K']} | {r['r']} | {r['provider']} | {r['value']:.1f} |" for r in merge]
        lines.append("")
    model = defaultdict(dict)
    for r in records:
        if r["benchmark"] == "model":
            model[(r["provider"], r["mode"])][r["metric"]] = r
    if model:
        lines += ["## Model (Llama-style decoder)", "",
                  "One training step (forward, backward, AdamW step) and inference. Weights and AdamW state in "
                  "the model's dtype (no fp32 master copy); LoRA adapters in fp32 as PEFT keeps them. Peak memory "
                  "is everything allocated during the step: weights, gradients, optimizer state, activations.", "",
                  "| provider | mode | time | tokens/s | trainable params | peak memory incl. optimizer |",
                  "|---|---|---|---|---|---|"]
        for (provider, mode), metrics in model.items():
            tps = metrics.get("tokens_per_s")
            prm = metrics.get("trainable_params")
            mem = metrics.get("peak_memory_incl_optimizer")
            tps_text = f"{tps['value']:,.0f}" if tps else "-"
            prm_text = f"{prm['value']:,}" if prm else "-"
            mem_text = f"{mem['value'] / 2**20:.0f} MiB" if mem else "-"
            lines.append(f"| {provider} | {mode} | {_fmt_time(metrics['time']['value'])} | {tps_text} | {prm_text} | "
                         f"{mem_text} |")
        lines.append("")
    path.write_text("\n".join(lines))


def summary(records):
    """A few lines for the end of a run's output: per layer shape, lorakernels' forward + backward
    time against the floor and PEFT; the Triton GEMM against cuBLAS; the model's tokens/s."""
    lines = []
    times = _index(records, "layer", "time")
    for key, rec in times.items():
        provider, mode, *shape = key
        if provider == "lorakernels" and mode == "full":
            refs = {name: times.get((name, "full", *shape)) for name in ("floor", "peft", "lorakernels-cublas")}
            lines.append(f"layer M={shape[0]} K={shape[1]} r={shape[3]} p={shape[4]}: {_fmt_time(rec['value'])}, "
                         + ", ".join(f"x {name} {_ratio(rec, ref)}" for name, ref in refs.items() if ref))
    gemm = _index(records, "gemm", "time")
    for key, rec in gemm.items():
        if key[0] == "triton-gemm":
            lines.append(f"gemm {key[1]} M={key[2]} K={key[3]}: triton / cublas "
                         f"{_ratio(rec, gemm.get(('cublas',) + key[1:]))}")
    for r in records:
        if r["benchmark"] == "model" and r["metric"] == "tokens_per_s":
            lines.append(f"model {r['provider']}: {r['value']:,.0f} tokens/s")
    return lines


def write_plots(records, env, out_dir):
    """Time vs tokens per provider (full step, per K); saved bytes, peak memory (CUDA) and the
    model's peak memory (CUDA) per provider. [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    times = [r for r in records if r["benchmark"] == "layer" and r["metric"] == "time" and r["mode"] == "full"]
    for K in sorted({r["K"] for r in times}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in sorted({r["provider"] for r in times}):
            pts = sorted((r["M"], r["value"] * 1e3) for r in times
                         if r["K"] == K and r["provider"] == provider and r["r"] == 16 and r["dropout"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set(xlabel="tokens", ylabel="ms (forward + backward)", title=f"K = N = {K}, r = 16, p > 0 ({env['device']})")
        ax.legend(fontsize=7)
        path = out_dir / f"time_vs_tokens_K{K}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
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


def _bar(plt, labels, values, ylabel, title, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, values)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
