"""Model-level workflow on a real Hugging Face Llama built from a small config (no downloads):
apply_lora, trainable set, state dict, merge/unmerge, merge_and_unload, disable_adapters, generate.
"""

import pytest
import torch
from torch import nn

from lorakernels import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def randomize_adapters(model):
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)


def test_apply_lora_replaces_matches_and_freezes_the_rest():
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.q_proj.weight
    apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # shared, not copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in adapted for p in ("lora_A", "lora_B")}
    assert set(lora_state_dict(model)) == trainable


def test_apply_lora_regex_and_no_match():
    model = tiny_llama()
    apply_lora(model, r".*layers\.1\.mlp\.(up|down)_proj", r=2)
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    fresh = tiny_llama()
    before = {n: type(m) for n, m in fresh.named_modules()}
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*q_proj"):
        apply_lora(fresh, ["qproj"])
    assert {n: type(m) for n, m in fresh.named_modules()} == before
    with pytest.raises(ValueError, match=r"r must be in \[1, 256\]"):
        apply_lora(fresh, ["q_proj"], r=0)
    assert {n: type(m) for n, m in fresh.named_modules()} == before


def test_forward_backward_merge_unmerge_unload_generate():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    base_logits = model(ids).logits
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
               lora_alpha=8, lora_dropout=0.1)
    torch.testing.assert_close(model(ids).logits, base_logits)  # fresh adapters: identity
    randomize_adapters(model)

    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [m.lora_A.grad for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        with disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base_logits)
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="needs unmerged adapters"):
            with disable_adapters(model):
                pass
        unmerge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("q_proj"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    generated = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 9)


def test_finetune_example_learns_and_saves(tmp_path, monkeypatch):
    """The README's example: loss goes down from ln(64) = 4.16, and the adapter is written.
    It runs on the torch backend: through the Triton interpreter its 25 steps take minutes,
    and the kernels are covered by their own tests."""
    from lorakernels.examples.finetune import main

    monkeypatch.setenv("LORAKERNELS_BACKEND", "torch")
    final_loss = main(["--steps", "25", "--output-dir", str(tmp_path)])
    assert final_loss < 3.8
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
