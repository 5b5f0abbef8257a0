"""QLoRA benchmarks: LoRA over a base quantized to NF4 by bitsandbytes (double quantization, as
QLoRA runs it), three ways, on the same 4-bit weight and adapter values.

    lorakernels     LoRALinear over the Linear4bit: F2/B2 dequantize W's tiles in registers, the
                    LoRA term in the same accumulator (on CPU: its torch backend)
    peft            PEFT's QLoRA layer (`lora.bnb.Linear4bit`): bitsandbytes' dequantize + matmul,
                    then the LoRA path unfused
    peft-patched    the same PEFT layer after `lorakernels.patch_peft`
    dequant-cublas  Unsloth's method: W dequantized by bitsandbytes into one reused buffer, cuBLAS
                    GEMMs, the LoRA term added with addmm in the compute dtype; W dequantized again
                    in backward. Dropout 0 only (Unsloth's fast path), so timed at p = 0.
    bnb-frozen      the Linear4bit alone (x still requires grad): bitsandbytes' 4-bit floor

Layer records are tagged benchmark "qlora-layer" (times, ratios to peft and dequant-cublas, saved
bytes, weight bytes, peak memory on CUDA); the model step "qlora-model" (a Llama-style decoder whose
decoder Linear layers are NF4: time, tokens/s, saved bytes, weight bytes, peak memory on CUDA).
"""

import torch
from torch import nn

from benchmarks.bench_layer import _shape_benchmarks, dtype_name, failure, shape_text
from benchmarks.bench_model import TARGETS, build_llama, train_steps
from benchmarks.harness import QUIET, installed, one_call
from benchmarks.providers import Provider, _peft_layer
from lorakernels import LoRALinear, apply_lora, four_bit, patch_peft
from lorakernels.model import _set_submodule
from lorakernels.testing import saved_activation_bytes

QLORA_PROVIDERS = ("lorakernels", "peft", "peft-patched", "dequant-cublas", "bnb-frozen")
QLORA_REFERENCES = ("peft", "dequant-cublas")
QLORA_MODEL_VARIANTS = ("peft", "lorakernels", "peft-patched", "dequant-cublas")  # ratios to the first


def linear4bit_from(linear, compute_dtype):
    """An NF4 (double-quantized) bitsandbytes Linear4bit holding `linear`'s weight, quantized on
    its device, frozen; bias kept in `compute_dtype`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(compute_dtype), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.to(linear.weight.device)  # quantizes


def _dequantize_into(params, buffer):
    """W dequantized by bitsandbytes into `buffer` ([N, K], the compute dtype). bitsandbytes 0.50
    writes into a given tensor on CUDA only; on a CPU it dequantizes into a new tensor, copied."""
    import bitsandbytes.functional as bnbf

    if buffer.device.type == "cuda":
        return bnbf.dequantize_4bit(params.data, params.quant_state, out=buffer)
    return buffer.copy_(bnbf.dequantize_4bit(params.data, params.quant_state))


class _DequantizeMatmulLoRA(torch.autograd.Function):
    """Unsloth's `LoRA_W`: y = x W^T + b + s (x A^T) B^T with W dequantized into `buffer` by
    bitsandbytes and the rank-r products in x's dtype; saves x (and A, B), dequantizes W again in
    backward."""

    @staticmethod
    def forward(ctx, x, params, bias, lora_A, lora_B, scaling, buffer):
        weight = _dequantize_into(params, buffer)
        rows = x.reshape(-1, x.shape[-1])
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        y = torch.addmm(bias, rows, weight.t()) if bias is not None else rows @ weight.t()
        y.addmm_(rows @ A.t(), B.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.params, ctx.scaling, ctx.buffer = params, scaling, buffer
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        rows, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        dy_b = dy @ B  # [M, r]
        d_A = torch.mm(dy_b.t(), rows) * s
        d_B = torch.mm(dy.t(), rows @ A.t()) * s
        weight = _dequantize_into(ctx.params, ctx.buffer)
        dx = dy @ weight
        dx.addmm_(dy_b, A, alpha=s)
        return dx.reshape(x.shape), None, None, d_A.to(lora_A.dtype), d_B.to(lora_B.dtype), None, None


class DequantizeToBuffer(nn.Module):
    """A QLoRA layer computed by Unsloth's method (see `_DequantizeMatmulLoRA`), holding a 4-bit
    LoRALinear's weight, bias and its own copies of the adapter values. `buffer`: the reused
    dequantization buffer, [N, K] or larger (one per model in Unsloth), in the compute dtype."""

    def __init__(self, lora, buffer=None):
        super().__init__()
        if lora.lora_dropout:
            raise ValueError("dequant-cublas (Unsloth's fast path) runs without dropout; got "
                             f"lora_dropout={lora.lora_dropout}")
        self.weight, self.bias, self.scaling = lora.weight, lora.bias, lora.scaling
        self.compute_dtype = lora.compute_dtype
        self.lora_A = nn.Parameter(lora.lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora.lora_B.detach().clone())
        N, K = lora.out_features, lora.in_features
        if buffer is None:
            buffer = torch.empty(N * K, device=lora.lora_A.device, dtype=self.weight.quant_state.dtype)
        self.buffer = buffer

    def forward(self, x):
        N, K = self.weight.quant_state.shape
        buffer = self.buffer[:N * K].view(N, K)
        dtype = self.compute_dtype or x.dtype
        y = _DequantizeMatmulLoRA.apply(x.to(dtype), self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                        buffer)
        return y.to(x.dtype)


def _peft_qlora(linear4bit, lora):
    """PEFT's QLoRA layer on `linear4bit`, holding copies of `lora`'s adapter values."""
    model = _peft_layer(linear4bit, lora)
    layer = model.base_model.model.layer
    assert type(layer).__module__ == "peft.tuners.lora.bnb", type(layer)
    return model


def make_qlora_providers(K, N, r, dtype, dropout, device, names=None):
    """({name: Provider}, the shared Linear4bit) on one NF4 base quantized from a random dense layer;
    the LoRA providers start from the same adapter values (lora_B random, as if trained)."""
    torch.manual_seed(0)
    dense = nn.Linear(K, N, device=device, dtype=dtype)
    linear4bit = linear4bit_from(dense, dtype)
    del dense
    lora = LoRALinear.from_linear(linear4bit, r=r, lora_alpha=r, lora_dropout=dropout)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.02)
    wanted = set(names or QLORA_PROVIDERS)
    out = {}
    if "lorakernels" in wanted:
        out["lorakernels"] = Provider("lorakernels", lora, lora=True)
    have_peft = installed("peft")
    if "peft" in wanted and have_peft:
        out["peft"] = Provider("peft", _peft_qlora(linear4bit, lora), lora=True)
    if "peft-patched" in wanted and have_peft:
        patched = _peft_qlora(linear4bit, lora)
        patch_peft(patched)
        out["peft-patched"] = Provider("peft-patched", patched, lora=True)
    if "dequant-cublas" in wanted and dropout == 0:
        out["dequant-cublas"] = Provider("dequant-cublas", DequantizeToBuffer(lora), lora=True)
    if "bnb-frozen" in wanted:
        out["bnb-frozen"] = Provider("bnb-frozen", linear4bit, lora=False)
    return out, linear4bit


def qlora_layer_benchmarks(device, shapes, dtype, budget, failures=None, names=None, progress=QUIET):
    """Every QLoRA provider at each (tokens M, K, N, r, dropout) shape: forward, backward and full
    times in alternation with ratios to PEFT and to dequant-cublas, saved bytes, trainable
    parameters, peak memory (CUDA), and the weight bytes (4-bit storage; dequant-cublas adds its
    dense buffer) with the bf16 bytes of the same weight. `progress`: a line per measurement, a
    step per shape."""
    failures = [] if failures is None else failures
    records = []
    for M, K, N, r, dropout in shapes:
        try:
            records += _qlora_shape(device, (M, K, N, r, dropout, dtype), budget, failures, names, progress)
        finally:
            progress.step()
    return records


def _qlora_shape(device, shape, budget, failures, names, progress):
    M, K, N, r, dropout, dtype = shape
    progress.note(f"{shape_text(*shape)}: building providers on an NF4 weight")
    try:
        layers, linear4bit = make_qlora_providers(K, N, r, dtype, dropout, device, names)
    except Exception as error:  # noqa: BLE001
        failures.append(failure("qlora-layer", f"providers at {shape}", error))
        return []
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    sample = one_call(device, budget)
    records = _shape_benchmarks(device, shape, layers, x, dy, budget, sample, failures, references=QLORA_REFERENCES,
                                benchmark="qlora-layer", progress=progress)
    stored = four_bit.storage_bytes(linear4bit.weight)
    base = dict(benchmark="qlora-layer", mode="full", M=M, K=K, N=N, r=r, dropout=dropout,
                dtype=dtype_name(dtype), p20=None, p80=None, unit="B")
    for name, provider in layers.items():
        buffer = provider.module.buffer if isinstance(provider.module, DequantizeToBuffer) else None
        extra = buffer.numel() * buffer.element_size() if buffer is not None else 0
        records += [dict(base, provider=name, metric="weight_bytes", value=stored + extra),
                    dict(base, provider=name, metric="weight_bytes_bf16", value=N * K * 2)]
    return records


# --- model level ---------------------------------------------------------------------------------------


def quantize_llama(model, dtype):
    """Every decoder nn.Linear (lm_head excepted, as transformers' BitsAndBytesConfig leaves it)
    becomes an NF4 Linear4bit computing in `dtype`; the model is marked as loaded in 4 bits."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.endswith("lm_head"):
            _set_submodule(model, name, linear4bit_from(module, dtype))
    model.is_loaded_in_4bit = True
    return model


def _qlora_variant(name, size, dtype, device, r):
    """A 4-bit Llama with rank-r adapters (dropout 0, so that Unsloth's method is comparable) on
    the attention and MLP projections, computed by variant `name`."""
    model = quantize_llama(build_llama(size, dtype, device), dtype)
    model.requires_grad_(False)
    if name in ("peft", "peft-patched"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0,
                                                           target_modules=TARGETS))
        if name == "peft-patched":
            patch_peft(model)
        return model
    apply_lora(model, TARGETS, r=r, lora_alpha=r, lora_dropout=0.0)
    if name == "dequant-cublas":  # one dequantization buffer for the whole model, as Unsloth's
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        largest = max(m.out_features * m.in_features for _, m in layers)
        buffer = torch.empty(largest, device=device, dtype=dtype)
        for target, module in layers:
            _set_submodule(model, target, DequantizeToBuffer(module, buffer))
    return model


def _model_weight_bytes(model):
    """Bytes of the model's parameters and buffers, a 4-bit weight counted with its quantization
    state, the dequant-cublas buffer once."""
    total, seen = 0, set()
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        tensors += [module.buffer] if isinstance(module, DequantizeToBuffer) else []
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += four_bit.storage_bytes(t) if four_bit.is_params4bit(t) else t.numel() * t.element_size()
    return total


def qlora_model_benchmarks(device, size, batch, seq, dtype, r, budget, failures=None, names=None, progress=QUIET):
    """One AdamW step of each QLoRA variant on a 4-bit Llama-style decoder, in alternation; then
    each variant's weight bytes and the bytes one training forward saves for backward (any
    device), and its peak memory (CUDA). `progress`: a line per measurement, one step."""
    failures = [] if failures is None else failures
    names = [n for n in (names or QLORA_MODEL_VARIANTS) if not n.startswith("peft") or installed("peft")]
    ids = torch.randint(0, size["vocab"], (batch, seq), device=device)
    base = dict(benchmark="qlora-model", M=batch * seq, K=size["hidden"], N=size["layers"], r=r, dropout=0.0,
                dtype=dtype_name(dtype), p20=None, p80=None)
    memory = {}  # name -> (bytes one training forward saves for backward, weight bytes)

    def build(name):
        """The variant's model; built the first time, it is also measured (not built again for that)."""
        model = _qlora_variant(name, size, dtype, device, r)
        if name not in memory:
            try:
                trainable = [p for p in model.parameters() if p.requires_grad]
                saved, _ = saved_activation_bytes(lambda: model.train()(ids, labels=ids).loss, trainable)
                memory[name] = (saved, _model_weight_bytes(model))
            except Exception as error:  # noqa: BLE001
                failures.append(failure("qlora-model", f"{name} memory", error))
                memory[name] = None
        return model

    try:
        records = train_steps(device, names, build, budget, ids, base, failures, section="qlora-model",
                              progress=progress)
    finally:
        progress.step()
    for name in [rec["provider"] for rec in records if rec["metric"] == "time"]:
        if memory.get(name):
            saved, weight = memory[name]
            rec = dict(base, provider=name, mode="train-step", unit="B")
            records += [dict(rec, metric="saved_bytes", value=saved), dict(rec, metric="weight_bytes", value=weight)]
    return records
