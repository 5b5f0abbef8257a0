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


def tiny_llama(seed=0, **config_overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **config_overrides)
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


def test_tied_lm_head_warns_and_merge_is_refused_until_untied():
    """Catches a merge that writes the adapter into a weight tied to the input embedding (the logits
    then change through the embedding too), and an apply_lora that does not warn about the tie."""
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 9))
    with pytest.warns(UserWarning, match=r"lm_head\.weight is tied to \['model\.embed_tokens\.weight'\]"):
        apply_lora(model, ["lm_head", "q_proj"], r=4, lora_alpha=8)
    randomize_adapters(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        adapted = model(ids).logits
    refused = r"weight with \['model\.embed_tokens\.weight'\]; the merge would change those too\. Untie first"
    for merge in (merge_lora, merge_and_unload, lambda m: m.lm_head.merge()):
        with pytest.raises(ValueError, match=refused):
            merge(model)
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert len(layers) == 3 and not any(m.merged for m in layers)  # nothing merged, nothing unloaded
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, adapted)
    # Untied as the message says, the merge is exact and leaves the embedding alone.
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    merge_and_unload(model)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make, targets, refused", [
    (lambda: nn.MultiheadAttention(8, 2), ["out_proj"], ["out_proj"]),
    (lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
     ["linear1", "linear2", "out_proj"], ["self_attn.out_proj", "linear1", "linear2"]),
    (lambda: nn.TransformerDecoderLayer(8, 2, dim_feedforward=16), ["out_proj"],
     ["self_attn.out_proj", "multihead_attn.out_proj"]),
], ids=["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer"])
def test_apply_lora_refuses_linears_whose_forward_pytorch_bypasses(make, targets, refused):
    """Catches adapters installed where PyTorch reads the weight itself (never calling the layer),
    which would be silently ignored; the refusal must leave the model unchanged."""
    model = make()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="bypassing their forward") as error:
        apply_lora(model, targets)
    assert all(name in str(error.value) for name in refused)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


def test_transformer_decoder_layer_feed_forward_is_adapted():
    """Catches a refusal broader than needed: TransformerDecoderLayer calls linear1/linear2 (no fast path),
    so an adapter there changes the output."""
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0).eval()
    x, memory = torch.randn(5, 2, 8), torch.randn(4, 2, 8)
    with torch.no_grad():
        base = layer(x, memory)
    apply_lora(layer, ["linear1", "linear2"], r=2)
    randomize_adapters(layer)
    with torch.no_grad():
        assert not torch.allclose(layer(x, memory), base)


def test_meta_model_apply_lora_forward_backward():
    """Catches a LoRA layer that cannot run on meta tensors (a model built under torch.device("meta")
    before its weights are loaded, as FSDP and accelerate do), where nn.Linear can."""
    with torch.device("meta"):
        model = tiny_llama()
    apply_lora(model, ["q_proj", "v_proj"], r=4, lora_dropout=0.1)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.is_meta and layer.weight.is_meta
    model.train()
    logits = model(torch.randint(0, 97, (2, 9), device="meta")).logits
    assert logits.is_meta and logits.shape == (2, 9, 97) and logits.dtype == torch.float32
    logits.sum().backward()
    assert layer.lora_A.grad.is_meta and layer.lora_A.grad.shape == layer.lora_A.shape
    assert layer.lora_B.grad.shape == layer.lora_B.shape and layer.weight.grad is None


def test_finetune_example_learns_and_saves(tmp_path, monkeypatch):
    """The README's example: loss goes down from ln(64) = 4.16, and the adapter is written.
    It runs on the torch backend: through the Triton interpreter its 25 steps take minutes,
    and the kernels are covered by their own tests."""
    from lorakernels.examples.finetune import main

    monkeypatch.setenv("LORAKERNELS_BACKEND", "torch")
    final_loss = main(["--steps", "25", "--output-dir", str(tmp_path)])
    assert final_loss < 3.8
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
