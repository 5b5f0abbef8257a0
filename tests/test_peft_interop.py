"""Interop with HF PEFT (optional dependency): adapters move both ways and compute the same.

Would catch: wrong key names or prefixes, transposed A/B, a wrong scaling (alpha / r vs
rsLoRA's alpha / sqrt(r)), target-module matching that differs from PEFT's.
"""

import pytest
import torch

from lorakernels import LoRALinear, load_adapter, save_adapter
from tests.test_model import tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_model(use_rslora, seed=0):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_rslora=use_rslora)
    model = peft.get_peft_model(tiny_llama(seed), config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def lora_grads_ours(model):
    return {f"{n}.lora_{p}": getattr(m, f"lora_{p}").grad for n, m in model.named_modules()
            if isinstance(m, LoRALinear) for p in ("A", "B")}


def lora_grads_peft(model):
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default.weight", "")
            out[key] = param.grad
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_and_matches_outputs_and_grads(tmp_path, use_rslora):
    reference = peft_model(use_rslora)
    reference.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    expected_scaling = 8 / 2 if use_rslora else 8 / 4
    assert all(m.scaling == expected_scaling for m in ours.modules() if isinstance(m, LoRALinear))

    ids = torch.randint(0, 97, (2, 7))
    out_ref = reference(ids, labels=ids)
    out_ours = ours(ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ref.loss.backward()
    out_ours.loss.backward()
    grads_ref, grads_ours = lora_grads_peft(reference), lora_grads_ours(ours)
    assert set(grads_ref) == set(grads_ours) and len(grads_ref) == 2 * 2 * len(TARGETS)
    for key in grads_ref:
        torch.testing.assert_close(grads_ours[key], grads_ref[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_in_peft(tmp_path, use_rslora):
    source = peft_model(use_rslora)
    source.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(), tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        adapter_effect = (source(ids).logits - tiny_llama()(ids).logits).abs().max()
        assert adapter_effect > 1e-3  # the adapter matters, so matching outputs means it was loaded
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
