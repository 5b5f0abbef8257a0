"""Benchmark providers: one setup factory per way of computing a (LoRA) linear layer.

Each factory builds its layer on the given device from one shared base weight, and returns
a Provider: the module to time, its trainable parameters, and whether it is a LoRA (so it
is comparable to the reference). All of them see the same inputs in the same run.

    floor        the frozen layer alone (F.linear forward + its dX GEMM): the physical floor
    lorakernels  LoRALinear with the fused kernels (on CPU: its torch backend), base_gemm="auto" (the
                 default: per GEMM pass the measured-fastest of the strategies below)
    lorakernels-fused  the same layer with base_gemm="triton": the fused GEMMs always
    lorakernels-tma  the same layer with base_gemm="triton-tma": the Hopper TMA-persistent GEMMs
                 (sm_90 and newer; under the interpreter too)
    lorakernels-cublas  the same layer (same base weight, same lora_A/lora_B Parameters) with
                 base_gemm="cublas": cuBLAS runs X W^T and dY W, the LoRA terms are fused
                 around it (where the Triton kernels run)
    unfused      plain-PyTorch LoRA written as PEFT writes it (dropout, A, B, scale, add)
    peft         a real HF PEFT LoRA layer (when peft is installed)
    peft-patched the same PEFT layer after `lorakernels.patch_peft(model)`: what the one line
                 buys a PEFT user (PEFT's own module and parameters, the fused kernels' compute)
    peft+compile the PEFT layer under torch.compile (CUDA only)
    full-ft      the same linear with a trainable weight
    adapter      a Houlsby bottleneck adapter (down, GELU, up, residual) after the frozen
                 layer, bottleneck sized to the LoRA's parameter count
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lorakernels import LoRALinear, four_bit, patch_peft
from lorakernels.plan import has_tma, interpreting


@dataclasses.dataclass
class Provider:
    name: str
    module: nn.Module
    lora: bool  # computes the LoRA function (comparable to lora_linear_ref)

    def trainable_parameters(self):
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


class Floor(nn.Module):
    """The frozen base layer alone; x still requires grad, so backward runs the dX GEMM."""

    def __init__(self, base):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class UnfusedLoRA(nn.Module):
    """PEFT's formulation in plain PyTorch: base(x) + B(A(dropout(x))) * s; nn.Dropout stores its mask."""

    def __init__(self, lora):
        super().__init__()
        self.weight, self.bias = lora.weight, lora.bias
        self.lora_A = nn.Parameter(lora.lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora.lora_B.detach().clone())
        self.scaling = lora.scaling
        self.dropout = nn.Dropout(lora.lora_dropout)

    def forward(self, x):
        result = F.linear(x, self.weight, self.bias)
        x = self.dropout(x.to(self.lora_A.dtype))
        return result + (F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling).to(result.dtype)


class BottleneckAdapter(nn.Module):
    """Houlsby adapter after the frozen layer: y = h + up(gelu(down(h))), h = x W^T + b.

    The bottleneck m is sized to a rank-r LoRA's parameter count: the adapter has
    2 * N * m + m + N parameters, the LoRA r * (K + N). The up-projection is random (std 0.02,
    like a trained adapter), not zero: GEMMs on zeros run faster and would flatter the timing.
    """

    def __init__(self, base, r, adapter_dtype):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        k, n = base.in_features, base.out_features
        bottleneck = max(1, round(r * (k + n) / (2 * n + 1)))
        kw = dict(device=base.weight.device, dtype=adapter_dtype)
        self.down = nn.Linear(n, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, n, **kw)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = F.linear(x, self.weight, self.bias)
        a = h.to(self.down.weight.dtype)
        return h + self.up(F.gelu(self.down(a))).to(h.dtype)


def _base(K, N, dtype, device, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(K, N, device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def _sharing_adapter(base, lora, **kwargs):
    """A LoRALinear on `base` (as `lora` is) holding `lora`'s own lora_A/lora_B Parameters (no copy)."""
    twin = LoRALinear.from_linear(base, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                  use_rslora=lora.use_rslora, adapter_dtype=lora.lora_A.dtype, **kwargs)
    twin.lora_A, twin.lora_B = lora.lora_A, lora.lora_B
    return twin


def make_providers(K, N, r, dtype, dropout, device, names=None, adapter_dtype=torch.float32, lora_alpha=None):
    """Every requested provider on one shared base layer; LoRA providers share adapter values."""
    lora_alpha = lora_alpha or r
    base = _base(K, N, dtype, device)
    lora = LoRALinear.from_linear(base, r=r, lora_alpha=lora_alpha, lora_dropout=dropout, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.02)  # a trained-looking adapter, so outputs differ from the base
    out = {}
    wanted = set(names) if names else None

    def want(name):
        return wanted is None or name in wanted

    if want("floor"):
        out["floor"] = Provider("floor", Floor(base), lora=False)
    if want("lorakernels"):
        out["lorakernels"] = Provider("lorakernels", lora, lora=True)
    if want("lorakernels-fused") and (torch.device(device).type == "cuda" or interpreting()):
        out["lorakernels-fused"] = Provider("lorakernels-fused", _sharing_adapter(base, lora, base_gemm="triton"),
                                            lora=True)
    if want("lorakernels-cublas") and (torch.device(device).type == "cuda" or interpreting()):
        out["lorakernels-cublas"] = Provider("lorakernels-cublas", _sharing_adapter(base, lora, base_gemm="cublas"),
                                             lora=True)
    if want("lorakernels-tma") and has_tma(torch.device(device)):
        out["lorakernels-tma"] = Provider("lorakernels-tma", _sharing_adapter(base, lora, base_gemm="triton-tma"),
                                          lora=True)
    if want("unfused"):
        out["unfused"] = Provider("unfused", UnfusedLoRA(lora), lora=True)
    if want("peft") or want("peft+compile"):
        peft_layer = _peft_layer(base, lora)
        if peft_layer is not None and want("peft"):
            out["peft"] = Provider("peft", peft_layer, lora=True)
        if peft_layer is not None and want("peft+compile") and torch.device(device).type == "cuda":
            # dynamic=False: every shape gets a static graph, as the first one would (a recompile
            # for a new K would otherwise trace a dynamic-shape graph).
            out["peft+compile"] = Provider("peft+compile", torch.compile(peft_layer, dynamic=False), lora=True)
    if want("peft-patched"):
        patched = _peft_layer(base, lora)
        if patched is not None:
            patch_peft(patched)
            out["peft-patched"] = Provider("peft-patched", patched, lora=True)
    if want("full-ft"):
        full = _base(K, N, dtype, device)
        full.requires_grad_(True)
        out["full-ft"] = Provider("full-ft", full, lora=False)
    if want("adapter"):
        out["adapter"] = Provider("adapter", BottleneckAdapter(base, r, adapter_dtype), lora=False)
    return out


def _peft_layer(base, lora):
    """A PeftModel of one PEFT LoRA layer over `base` holding copies of `lora`'s adapter values: over
    an nn.Linear (its weight and bias shared, not copied) PEFT's lora.Linear; over a bitsandbytes
    Linear4bit PEFT's QLoRA layer (lora.bnb.Linear4bit). None without peft."""
    try:
        import peft
    except ImportError:
        return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            if four_bit.is_linear4bit(base):
                self.layer = base
                self.is_loaded_in_4bit = True  # PEFT then builds its QLoRA layer class
                return
            self.layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta",
                                   dtype=base.weight.dtype)
            self.layer.weight, self.layer.bias = base.weight, base.bias

        def forward(self, x):
            return self.layer(x)

    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             target_modules=["layer"], use_rslora=lora.use_rslora)
    model = peft.get_peft_model(Wrapper(), config)
    layer = model.base_model.model.layer
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora.lora_A)
        layer.lora_B["default"].weight.copy_(lora.lora_B)
    layer.lora_A["default"].to(lora.lora_A.dtype)
    layer.lora_B["default"].to(lora.lora_B.dtype)
    return model
