"""Model-level benchmarks on a Llama-style decoder built from a transformers config (random
weights, no downloads): one training step (forward, backward, AdamW step) for full fine-tuning,
LoRA with the fused kernels, LoRA as PEFT computes it (real PEFT when installed, else the
unfused reference), and bottleneck adapters; then inference latency for base, LoRA merged,
LoRA unmerged and adapters."""

import gc

import torch
from torch import nn

from benchmarks.bench_layer import dtype_name, failure
from benchmarks.harness import bench, peak_memory
from benchmarks.providers import BottleneckAdapter, UnfusedLoRA
from lorakernels import LoRALinear, apply_lora, merge_lora, unmerge_lora
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
    if name == "peft":
        try:
            import peft
        except ImportError:
            peft = None
        if peft is not None:
            config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout, target_modules=TARGETS)
            return peft.get_peft_model(model, config)
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


def model_benchmarks(device, size, batch, seq, dtype, r, dropout, repeats, inference_shapes, providers=None,
                     failures=None):
    """One AdamW training step per variant, then inference latency. A variant that fails is
    reported in `failures` and the others still run."""
    records = []
    failures = [] if failures is None else failures
    ids = torch.randint(0, size["vocab"], (batch, seq), device=device)
    names = providers or ["full-ft", "lorakernels", "peft", "adapter"]
    base = dict(benchmark="model", M=batch * seq, K=size["hidden"], N=size["layers"], r=r, dropout=dropout,
                dtype=dtype_name(dtype), p20=None, p80=None)
    for name in names:
        try:
            records += _train_step(device, name, size, dtype, r, dropout, repeats, ids, base)
        except Exception as error:  # noqa: BLE001 - one broken variant must not end a GPU session
            failures.append(failure("model", f"{name} train step", error))
        gc.collect()  # the previous variant must be gone before the next one's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        records += _inference(device, size, dtype, r, repeats, inference_shapes, base)
    except Exception as error:  # noqa: BLE001
        failures.append(failure("model", "inference", error))
    return records


def _train_step(device, name, size, dtype, r, dropout, repeats, ids, base):
    model = _variant(name, size, dtype, device, r, dropout).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    step()  # creates the optimizer state, so peak memory includes it
    # A ~1B-model step takes ~0.1 s on a GPU: a 1 s window times about ten of them.
    median, p20, p80 = bench(step, device, repeats, rep_ms=1000)
    rec = dict(base, provider=name, mode="train-step")
    mem = peak_memory(step, device, include_resident=True)  # weights, gradients, optimizer state, activations
    records = [dict(rec, metric="time", value=median, p20=p20, p80=p80, unit="s"),
               dict(rec, metric="tokens_per_s", value=ids.numel() / median, unit="tok/s"),
               dict(rec, metric="trainable_params", value=sum(p.numel() for p in params), unit="")]
    if mem is not None:
        records.append(dict(rec, metric="peak_memory_incl_optimizer", value=mem, unit="B"))
    return records


@torch.no_grad()
def _inference(device, size, dtype, r, repeats, shapes, base):
    records = []
    models = {"base": build_llama(size, dtype, device).eval(),
              "lora-unmerged": _variant("lorakernels", size, dtype, device, r, 0.0).eval(),
              "adapter": _variant("adapter", size, dtype, device, r, 0.0).eval()}
    for name, module in models.items():
        for m in module.modules():
            if isinstance(m, LoRALinear):
                nn.init.normal_(m.lora_B, std=0.02)
    for batch, seq in shapes:
        ids = torch.randint(0, size["vocab"], (batch, seq), device=device)
        for name, model in models.items():
            t = bench(lambda: model(ids), device, repeats)
            records.append(dict(base, provider=name, mode=f"inference b{batch} s{seq}", M=batch * seq, metric="time",
                                value=t[0], p20=t[1], p80=t[2], unit="s"))
        merge_lora(models["lora-unmerged"])
        t = bench(lambda: models["lora-unmerged"](ids), device, repeats)
        records.append(dict(base, provider="lora-merged", mode=f"inference b{batch} s{seq}", M=batch * seq,
                            metric="time", value=t[0], p20=t[1], p80=t[2], unit="s"))
        unmerge_lora(models["lora-unmerged"])
    return records
