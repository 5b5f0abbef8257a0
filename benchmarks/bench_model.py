"""Model-level benchmarks on a Llama-style decoder built from a transformers config (random
weights, no downloads): one training step (forward, backward, AdamW step) for full fine-tuning,
LoRA with the fused kernels, LoRA as PEFT computes it (real PEFT when installed, else the
unfused reference), the same PEFT model after `lorakernels.patch_peft` (when peft is installed),
and bottleneck adapters; then inference latency for base, LoRA merged,
LoRA unmerged and adapters. The variants are timed in alternation (harness.interleave)."""

import copy
import gc

import torch
from torch import nn

from benchmarks.bench_layer import dtype_name, failure
from benchmarks.harness import QUIET, call_batches, installed, interleave, peak_memory
from benchmarks.providers import BottleneckAdapter, UnfusedLoRA
from lorakernels import LoRALinear, apply_lora, merge_lora, patch_peft
from lorakernels.model import _set_submodule, find_target_modules

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama(size, dtype, device, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"],
                                      intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                                      num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                                      max_position_embeddings=4096)
    # Built (and randomly initialized) on the device itself: a ~1B model initialized on the
    # CPU and then moved would take seconds per variant.
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def _variant(name, size, dtype, device, r, dropout):
    model = build_llama(size, dtype, device)
    if name == "full-ft":
        return model
    if name in ("peft", "peft-patched"):  # peft-patched: PEFT's model, its LoRA layers fused
        import peft  # an ImportError is reported as this variant's failure, never another variant's numbers

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout,
                                                           target_modules=TARGETS))
        if name == "peft-patched":
            patch_peft(model)
        return model
    if name == "adapter":
        model.requires_grad_(False)
        for target in find_target_modules(model, TARGETS):
            _set_submodule(model, target, BottleneckAdapter(model.get_submodule(target), r, torch.float32))
        return model
    apply_lora(model, TARGETS, r=r, lora_alpha=r, lora_dropout=dropout, adapter_dtype=torch.float32)
    if name in ("peft", "unfused"):  # "peft" without peft installed: PEFT's formulation in plain PyTorch
        for target, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
            _set_submodule(model, target, UnfusedLoRA(module))
    return model


def model_benchmarks(device, size, batch, seq, dtype, r, dropout, budget, inference_shapes, providers=None,
                     failures=None, progress=QUIET):
    """One AdamW training step per variant, then inference latency, each with the variants in
    alternation. A variant that fails is reported in `failures` and the others still run.
    `progress`: a line per measurement, a step for the training steps and one for inference."""
    return [rec for part in model_benchmark_parts(device, size, batch, seq, dtype, r, dropout, budget,
                                                   inference_shapes, providers, failures, progress) for rec in part]


def model_benchmark_parts(device, size, batch, seq, dtype, r, dropout, budget, inference_shapes, providers=None,
                          failures=None, progress=QUIET):
    """`model_benchmarks` in two parts, each measured when asked for: the training steps' records,
    then inference's (a run can write the first before it starts the second)."""
    failures = [] if failures is None else failures
    ids = torch.randint(0, size["vocab"], (batch, seq), device=device)
    peft = ["peft", "peft-patched"] if installed("peft") else []
    names = providers or ["full-ft", "lorakernels", *peft, "adapter"]
    base = dict(benchmark="model", M=batch * seq, K=size["hidden"], N=size["layers"], r=r, dropout=dropout,
                dtype=dtype_name(dtype), p20=None, p80=None)
    try:
        records = train_steps(device, names, lambda name: _variant(name, size, dtype, device, r, dropout), budget,
                              ids, base, failures, progress=progress)
    finally:
        progress.step()
    yield records
    records = []
    try:
        records = _inference(device, size, dtype, r, budget, inference_shapes, base, progress)
    except Exception as error:  # noqa: BLE001
        failures.append(failure("model", "inference", error))
    finally:
        progress.step()
    yield records


def train_steps(device, names, build, budget, ids, base, failures, section="model", progress=QUIET):
    """The variants' training steps in alternation (every model held at once), each sample one
    step by the host clock, the device synchronized around it: a ~1B-model step takes ~0.1 s on
    a GPU, so do_bench's L2 flush does not matter and its extra runs would cost seconds. Then
    (CUDA) each variant's peak memory, one model in memory at a time. `build(name)` makes a
    variant's model; `base`: the fields every record shares; failures are tagged `section`."""
    steps, params = {}, {}
    for name in names:
        try:
            steps[name], params[name] = _training_step(build(name), ids)
            progress.note(f"{name}: built, one training step run")
        except Exception as error:  # noqa: BLE001 - one broken variant must not end a GPU session
            failures.append(failure(section, f"{name} train step", error))
    # At least 10 steps per variant (the GPU protocol's 5 rounds would leave p20 and p80 at the extremes).
    budget = budget._replace(rounds=max(budget.rounds, 10))
    timing = interleave(steps, call_batches(device, calls=1), budget, warmup=1)
    for name, error in timing.errors.items():
        failures.append(failure(section, f"{name} train step", error))
    progress.note(f"training step timed: {len(timing.names())} variants, {len(timing.rounds)} rounds")
    records = []
    for name in timing.names():
        median, p20, p80 = timing.stats(name)
        rec = dict(base, provider=name, mode="train-step")
        records += [dict(rec, metric="time", value=median, p20=p20, p80=p80, unit="s"),
                    dict(rec, metric="tokens_per_s", value=ids.numel() / median, unit="tok/s"),
                    dict(rec, metric="trainable_params", value=params[name], unit="")]
        ratio = timing.ratio(name, names[0]) if name != names[0] else None
        if ratio:
            records.append(dict(rec, metric=f"ratio_to_{names[0]}", value=ratio[0], p20=ratio[1], p80=ratio[2],
                                unit="x"))
    del steps, timing
    _release(device)
    timed = [rec["provider"] for rec in records if rec["metric"] == "time"]
    return records + _train_peak_memory(device, timed, build, ids, base, failures, section, progress)


def _train_peak_memory(device, names, build, ids, base, failures, section, progress=QUIET):
    """Peak memory of a training step (CUDA; nothing elsewhere): weights, gradients, optimizer
    state and activations, each variant built anew and alone in memory."""
    records = []
    for name in names if device.type == "cuda" else ():
        try:
            step, _ = _training_step(build(name), ids)
            mem = peak_memory(step, device, include_resident=True)
            records.append(dict(base, provider=name, mode="train-step", metric="peak_memory_incl_optimizer",
                                value=mem, unit="B"))
            progress.note(f"{name}: peak memory of a training step")
        except Exception as error:  # noqa: BLE001
            failures.append(failure(section, f"{name} peak memory", error))
        step = None
        _release(device)
    return records


def _release(device):
    gc.collect()  # the previous models must be gone before the next peak is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _training_step(model, ids):
    """(step, trainable parameter count) of one variant's model; the step has run once, so the
    optimizer state exists (and peak memory includes it)."""
    model = model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    step()
    return step, sum(p.numel() for p in params)


@torch.no_grad()
def _inference(device, size, dtype, r, budget, shapes, base, progress=QUIET):
    """Inference latency of base, LoRA unmerged, LoRA merged (a merged copy) and adapters, the four
    in alternation, with each one's per-round ratio to base. Each sample is one forward by the host
    clock, the device synchronized around it, at least 10 rounds (as `train_steps`: a ~1B model's
    weights are far larger than the L2 cache, so do_bench's flush changes nothing, and a do_bench
    call would run a forward of up to ~0.1 s eight times or more)."""
    models = {"base": build_llama(size, dtype, device).eval(),
              "lora-unmerged": _variant("lorakernels", size, dtype, device, r, 0.0).eval(),
              "adapter": _variant("adapter", size, dtype, device, r, 0.0).eval()}
    for m in models["lora-unmerged"].modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.02)
    models["lora-merged"] = merge_lora(copy.deepcopy(models["lora-unmerged"]))
    progress.note(f"inference: {len(models)} models built")
    budget = budget._replace(rounds=max(budget.rounds, 10))
    records = []
    for batch, seq in shapes:
        ids = torch.randint(0, size["vocab"], (batch, seq), device=device)
        timing = interleave({name: (lambda m=model: m(ids)) for name, model in models.items()},
                            call_batches(device, calls=1), budget)
        if timing.errors:
            raise next(iter(timing.errors.values()))
        rec = dict(base, mode=f"inference b{batch} s{seq}", M=batch * seq)
        for name in timing.names():
            median, p20, p80 = timing.stats(name)
            records.append(dict(rec, provider=name, metric="time", value=median, p20=p20, p80=p80, unit="s"))
            ratio = timing.ratio(name, "base") if name != "base" else None
            if ratio:
                records.append(dict(rec, provider=name, metric="ratio_to_base", value=ratio[0], p20=ratio[1],
                                    p80=ratio[2], unit="x"))
        progress.note(f"inference b{batch} s{seq}: {len(timing.names())} models, {len(timing.rounds)} rounds")
    return records
