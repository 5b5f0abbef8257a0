"""QLoRA: LoRA over bitsandbytes 4-bit (NF4) base layers through the public API: LoRALinear,
lora_linear, apply_lora on a Llama whose Linear layers are 4-bit, merge_and_unload, adapter files
shared with PEFT, torch.compile.

The 4-bit layers are built by hand from dense ones (`linear4bit`): bitsandbytes 0.50 quantizes a
`Params4bit` when its layer is moved to a device, `.to("cpu")` included, so no GPU is needed.
The reference weight is `FourBitWeight.dequantize` (bitsandbytes' own CPU dequantization is wrong
where quantization blocks straddle rows; tests/test_four_bit_kernels.py checks the two agree
elsewhere).

Each test says what it would catch.
"""

import pytest
import torch
from torch import nn

from lorakernels import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_linear,
    merge_and_unload,
    merge_lora,
    save_adapter,
)
from lorakernels.operands import FourBitWeight
from lorakernels.testing import saved_activation_bytes
from tests.utils import DEVICE, assert_close_to_reference, assert_same, reference_grads, replay_keep_mask, run

bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16, nested=True, dense=None):
    """A quantized NF4 bitsandbytes Linear4bit holding `dense`'s weight (a fresh nn.Linear by default)."""
    dense = dense if dense is not None else nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.to(compute_dtype or torch.float32), requires_grad=False,
                                     quant_type="nf4", compress_statistics=nested)
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.to(compute_dtype or torch.float32), requires_grad=False)
    return layer.to(DEVICE)  # quantizes


def quantize_linears(model, compute_dtype=torch.bfloat16):
    """Every nn.Linear of the model but lm_head becomes a 4-bit Linear4bit (as transformers'
    BitsAndBytesConfig leaves lm_head in 16 bits); the model is marked as 4-bit for PEFT."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    linear4bit(module.in_features, module.out_features, module.bias is not None, compute_dtype,
                               dense=module))
    model.is_loaded_in_4bit = True  # what transformers sets on a model loaded in 4 bits; PEFT reads it
    return model


def tiny_llama_4bit(seed=0):
    """A Llama in bf16 whose decoder Linear layers are NF4. Every in_features is a multiple of the
    blocksize (64), where bitsandbytes' CPU dequantization, which PEFT's layers use, is right."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return quantize_linears(transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval())


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


# --- one layer: numerics against fp64 on the dequantized weight --------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_matches_fp64_reference_on_the_dequantized_weight(backend, compute_dtype, p):
    """Output and the x, A, B gradients of a LoRALinear over a Linear4bit (fp32 adapters, 3-D input,
    K = 96: blocks straddle rows) against fp64 on the dequantized weight, with the replayed dropout
    mask. Would catch a wrong base description (codes, scales, table), a bias or dtype slip, or a
    backward that does not see the 4-bit weight."""
    M, K, N, r = 37, 96, 40, 8
    layer = LoRALinear.from_linear(linear4bit(K, N, compute_dtype=compute_dtype), r=r, lora_alpha=12,
                                   lora_dropout=p, backend=backend)
    assert layer.lora_A.dtype == torch.float32
    nn.init.normal_(layer.lora_B)
    x = torch.randn(1, M, K).to(compute_dtype).requires_grad_()
    rng_state = torch.get_rng_state()
    y = layer(x)
    keep = replay_keep_mask(rng_state, M, K, p, backend)
    dy = torch.randn(y.shape).to(compute_dtype)
    y.backward(dy)

    weight, bias = layer.four_bit_base().dequantize(compute_dtype), layer.bias
    args = (x, weight, bias, layer.lora_A, layer.lora_B, layer.scaling, keep, p)
    y64, grads64 = reference_grads(*args, dy.double(), upcast=True)
    y_lp, grads_lp = reference_grads(*args, dy, upcast=False)
    assert y.dtype == compute_dtype and x.grad.dtype == compute_dtype and layer.lora_A.grad.dtype == torch.float32
    assert_close_to_reference("y", y.detach(), y64, y_lp, compute_dtype)
    for name, actual, exp64, lowp in zip(("dx", "dA", "dB"), (x.grad, layer.lora_A.grad, layer.lora_B.grad),
                                         grads64, grads_lp):
        assert_close_to_reference(name, actual, exp64, lowp, compute_dtype)
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_computes_in_the_compute_dtype_and_returns_x_dtype(backend):
    """fp32 activations into a bf16-compute Linear4bit: computed in bf16 and returned in fp32, as
    Linear4bit does, with dx back in fp32. Would catch a layer computing in x's dtype (another
    result) or returning the compute dtype."""
    layer = LoRALinear.from_linear(linear4bit(64, 24, nested=False), r=4, backend=backend)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    expected = layer(x.detach().to(torch.bfloat16))
    assert torch.equal(y.detach(), expected.float())


def test_layer_without_compute_dtype_computes_in_x_dtype():
    """A Linear4bit without compute_dtype computes in x's dtype (fp16 here), and merges into the dtype
    it was quantized from (fp32). Would catch a None compute dtype reaching a cast, or a merge in
    another dtype."""
    layer = LoRALinear.from_linear(linear4bit(64, 24, compute_dtype=None), r=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64)
    assert layer(x.half()).dtype == torch.float16
    merged = layer.merged_linear()
    assert merged.weight.dtype == torch.float32 and merged.bias.dtype == torch.float32
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_merged_linear_of_a_dense_layer_equals_an_in_place_merge():
    """merged_linear() also serves a dense base: the same bits as merge(), the layer left unmerged."""
    layer = LoRALinear(48, 20, r=4, dtype=torch.bfloat16)
    nn.init.normal_(layer.lora_B)
    merged = layer.merged_linear()
    assert not layer.merged
    layer.merge()
    assert torch.equal(merged.weight, layer.weight) and torch.equal(merged.bias, layer.bias)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saved_state_holds_no_dense_weight(backend, nested):
    """Autograd keeps x, U and the 4-bit weight's scales and code table as bitsandbytes
    holds them: 4 bytes per block of 64 weights, or under double quantization its 1-byte codes plus
    their packed second-level state (offset, 256-entry table, one scale per 256 blocks),
    never the fp32 scales expanded from them (backward expands them again). Would catch a
    dequantized W or the expanded scales saved for backward (or an fp32 copy of x)."""
    M, K, N, r = 32, 128, 96, 8
    layer = LoRALinear.from_linear(linear4bit(K, N, nested=nested), r=r, lora_dropout=0.1, backend=backend)
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    saved, y = saved_activation_bytes(lambda: layer(x), list(layer.parameters()))
    blocks = N * K // 64
    scales = blocks + 4 * (1 + 256 + -(-blocks // 256)) if nested else 4 * blocks
    assert saved == M * K * 2 + M * r * 4 + scales + 16 * 4, f"saved {saved} bytes"
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


def test_lora_linear_takes_params4bit_and_four_bit_weight_alike():
    """lora_linear(x, Params4bit, ...) and lora_linear(x, FourBitWeight, ...) are one computation, and
    the codes are shared, not copied. Would catch a conversion that drops the bias, the scales'
    expansion or the shape."""
    base = linear4bit(64, 24)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    lora_A, lora_B = torch.randn(4, 64), torch.randn(24, 4)
    y1 = lora_linear(x, base.weight, base.bias, lora_A, lora_B, 0.5)
    description = FourBitWeight.from_bitsandbytes(base.weight.data, base.weight.quant_state)
    assert description.codes.data_ptr() == base.weight.data_ptr()
    y2 = lora_linear(x, description, base.bias, lora_A, lora_B, 0.5)
    assert y1.shape == (3, 5, 24) and torch.equal(y1, y2)
    # No cuBLAS GEMM reads a 4-bit W: that strategy runs the same fused 4-bit kernels.
    assert torch.equal(lora_linear(x, description, base.bias, lora_A, lora_B, 0.5, base_gemm="cublas"), y1)


# --- torch.compile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_matches_eager(backend):
    """torch.compile(fullgraph=True) of a 4-bit LoRALinear (double-quantized scales expanded in the
    graph, the custom ops with the 4-bit arguments): same output and gradients as eager. Would
    catch a graph break, a wrong fake shape for the 4-bit codes, or arguments lost at the op."""
    layer = LoRALinear.from_linear(linear4bit(64, 40), r=4, lora_alpha=8, backend=backend)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64, dtype=torch.bfloat16)

    def run(f):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        y = f(leaf)
        y.float().pow(2).sum().backward()
        return [y.detach(), leaf.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# --- validation ----------------------------------------------------------------------------------------


def _operands():
    base = linear4bit(64, 24)
    return (torch.randn(5, 64, dtype=torch.bfloat16), base.weight, base.bias, torch.randn(4, 64),
            torch.randn(24, 4))


@pytest.mark.parametrize("change, error, message", [
    (dict(x=torch.randn(5, 48, dtype=torch.bfloat16)), ValueError,
     r"in_features = 64 \(4-bit weight \(24, 64\)\); got x \(5, 48\)"),
    (dict(x=torch.randint(0, 3, (5, 64))), TypeError, r"x must be float32, float16 or bfloat16; got torch.int64"),
    (dict(bias=torch.randn(24)), TypeError, r"bias must have x's dtype .*torch.float32.*torch.bfloat16"),
    (dict(bias=torch.randn(23, dtype=torch.bfloat16)), ValueError, r"bias must be \(out_features,\) = \(24,\)"),
    (dict(lora_A=torch.randn(4, 63)), ValueError, r"lora_A must be \(r, in_features\) = \(r, 64\); got \(4, 63\)"),
    (dict(lora_B=torch.randn(23, 4)), ValueError, r"lora_B must be \(out_features, r\) = \(24, 4\); got \(23, 4\)"),
    (dict(lora_A=torch.randn(4, 64, dtype=torch.float16), lora_B=torch.randn(24, 4, dtype=torch.float16)),
     TypeError, r"lora_A and lora_B must share one dtype, x's \(torch.bfloat16\) or float32"),
    (dict(lora_A=torch.randn(4, 64, device="meta")), TypeError, r"one device.*weight codes"),
])
def test_lora_linear_rejects_mismatched_four_bit_operands(change, error, message):
    """Clear errors naming the shapes, dtypes and devices. Would catch an unchecked 4-bit path that
    launches on mismatched operands."""
    x, weight, bias, lora_A, lora_B = _operands()
    operands = {**dict(x=x, bias=bias, lora_A=lora_A, lora_B=lora_B), **change}
    with pytest.raises(error, match=message):
        lora_linear(operands["x"], weight, operands["bias"], operands["lora_A"], operands["lora_B"], 0.5)


def test_four_bit_description_needs_contiguous_tensors_and_one_bias():
    """The kernels read the codes at flat offsets, and the bias comes from one place. Would catch a
    strided view of codes read as if contiguous, or a description's bias silently ignored."""
    x, weight, bias, lora_A, lora_B = _operands()
    described = FourBitWeight.from_bitsandbytes(weight.data, weight.quant_state, bias)
    with pytest.raises(ValueError, match=r"carries a bias of its own"):
        lora_linear(x, described, None, lora_A, lora_B, 0.5)
    lora_linear(x, described, bias, lora_A, lora_B, 0.5)  # the same bias both ways is fine
    doubled = torch.stack([described.codes, described.codes], dim=1)
    strided = FourBitWeight(doubled[:, 0], described.absmax, described.table, 64, (24, 64), nested=described.nested)
    with pytest.raises(ValueError, match=r"weight codes of the 4-bit weight \(24, 64\) must be contiguous"):
        lora_linear(x, strided, bias, lora_A, lora_B, 0.5)


def test_from_linear_refusals_change_nothing():
    """An unquantized Linear4bit, or adapters in a third dtype, fail at wrapping with the reason; the
    Linear4bit is left as it was."""
    unquantized = bnb.nn.Linear4bit(64, 24, compute_dtype=torch.bfloat16, quant_type="nf4")
    with pytest.raises(ValueError, match=r"not quantized yet .*\.to\(device\)"):
        LoRALinear.from_linear(unquantized)
    layer = linear4bit(64, 24)
    with pytest.raises(TypeError, match=r"adapter_dtype over a 4-bit base must be float32 or .*bfloat16.*float16"):
        LoRALinear.from_linear(layer, adapter_dtype=torch.float16)
    assert layer.weight.requires_grad is False and layer.bias.requires_grad is False
    assert LoRALinear.from_linear(layer, adapter_dtype=torch.bfloat16).lora_A.dtype == torch.bfloat16
    int8 = bnb.nn.Linear8bitLt(64, 24, has_fp16_weights=False).to(DEVICE)
    with pytest.raises(TypeError, match=r"float weight, or a bitsandbytes Linear4bit; got Linear8bitLt"):
        LoRALinear.from_linear(int8)


# --- whole models ----------------------------------------------------------------------------------------


def test_apply_lora_keeps_the_four_bit_weights_and_trains_adapters_only():
    """apply_lora over the 4-bit Llama: every projection wrapped, its Params4bit shared (no copy),
    adapters fp32 and the only trainable parameters; a few AdamW steps lower the loss (gradients
    reach every adapter through the 4-bit layers). Would catch Linear4bit left unwrapped, a
    dequantized copy, or gradients that do not flow."""
    model = tiny_llama_4bit()
    q_proj = model.model.layers[0].self_attn.q_proj
    params4bit = q_proj.weight
    apply_lora(model, TARGETS, r=4, lora_alpha=8, lora_dropout=0.1)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(TARGETS) and all(m.four_bit for m in layers)
    assert model.model.layers[0].self_attn.q_proj.weight is params4bit
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(layers) and all(p.dtype == torch.float32 for p in trainable)

    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 97, (2, 12))
    losses = []
    for step in range(4):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        # lora_B starts at zero, so dA = s (dY B)^T X is zero until the first step has moved B.
        assert all(m.lora_B.grad.abs().sum() > 0 and (step == 0 or m.lora_A.grad.abs().sum() > 0) for m in layers)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert model.model.layers[0].self_attn.q_proj.weight is params4bit


def test_merge_and_unload_gives_16_bit_linears_matching_the_four_bit_model():
    """merge_and_unload: plain bf16 nn.Linear layers (dequantized W + s B A) whose logits equal the
    unmerged 4-bit model's to bf16 rounding; in-place merging refuses, changing nothing. Would catch a
    merge that drops the adapter or the bias, re-quantizes, or uses the wrong scaling."""
    model = tiny_llama_4bit()
    apply_lora(model, TARGETS, r=4, lora_alpha=8)
    torch.manual_seed(1)
    for m in lora_layers(model):
        nn.init.normal_(m.lora_B, std=0.05)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        with disable_adapters(model):
            base = model(ids).logits.float()
    assert (unmerged - base).abs().max() > 0.05  # the adapters matter

    with pytest.raises(TypeError, match=r"merge_and_unload"):
        merge_lora(model)
    with pytest.raises(TypeError, match=r"merge_and_unload"):
        lora_layers(model)[0].merge()
    assert not any(m.merged for m in lora_layers(model))

    merge_and_unload(model)
    linears = [m for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
    assert len(linears) == 2 * len(TARGETS)
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
               for m in linears)
    with torch.no_grad():
        merged = model(ids).logits.float()
    # bf16 activations through 2 layers: a few bf16 steps (eps 2**-8) at the logits' scale.
    tolerance = 8 * 2**-8 * unmerged.abs().max().item()
    assert (merged - unmerged).abs().max().item() < tolerance


# --- adapter files shared with PEFT ----------------------------------------------------------------------


def peft_qlora_model(peft, seed=0):
    """PEFT's own QLoRA layers (peft.tuners.lora.bnb.Linear4bit, chosen from `is_loaded_in_4bit`)
    over the 4-bit Llama, with random lora_B so the adapter matters."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(tiny_llama_4bit(seed), config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return model


def test_adapters_move_between_peft_qlora_and_lorakernels(tmp_path):
    """A PEFT QLoRA adapter (saved from PEFT's bnb LoRA layers) loads onto our 4-bit model and
    computes PEFT's logits; ours, saved, loads back into PEFT's QLoRA model with the same keys.
    The models are run in train mode: bitsandbytes repacks a CPU weight in place in eval mode
    without gradients. Would catch other keys, transposed factors or a wrong scaling."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    source = peft_qlora_model(peft).train()
    assert type(source.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    source.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama_4bit(), tmp_path / "peft").train()
    assert all(m.four_bit and m.lora_A.dtype == torch.float32 for m in lora_layers(ours))
    save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == keys
    reloaded = peft.PeftModel.from_pretrained(tiny_llama_4bit(), tmp_path / "ours").train()

    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected, got, back = (m(ids).logits.float() for m in (source, ours, reloaded))
        with disable_adapters(ours):
            base = ours(ids).logits.float()
    assert (expected - base).abs().max() > 0.05  # the adapter matters
    torch.testing.assert_close(back, expected, rtol=0, atol=0)
    # PEFT runs the base GEMM and the adapter separately in bf16; the fused kernel accumulates both
    # in fp32 and rounds once: they differ by bf16 rounding, a few steps at the logits' scale.
    assert (got - expected).abs().max().item() < 8 * 2**-8 * expected.abs().max().item()


# --- patch_peft on PEFT's QLoRA layers ---------------------------------------------------------------


def _peft_4bit_mlp(peft, loaded_in_4bit, compute_dtype, x_dtype=torch.float32, adapter_dtype=None, bias=True):
    """A 4-bit layer (128 -> 64, blocks within rows) and a dense one under PEFT LoRA. With
    `loaded_in_4bit` PEFT wraps the 4-bit layer in its QLoRA class `lora.bnb.Linear4bit`, else in
    `lora.Linear`; both forwards are routed."""
    torch.manual_seed(0)
    base = nn.Sequential(linear4bit(128, 64, bias=bias, compute_dtype=compute_dtype),
                         nn.Linear(64, 8, dtype=x_dtype))
    base.is_loaded_in_4bit = loaded_in_4bit
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"],
                                                      init_lora_weights=False)).train()
    if adapter_dtype is not None:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(adapter_dtype)
    expected_class = "peft.tuners.lora.bnb" if loaded_in_4bit else "peft.tuners.lora.layer"
    assert type(model.base_model.model[0]).__module__ == expected_class
    return model


@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["lora.bnb.Linear4bit", "lora.Linear"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_peft_fuses_qlora_layers_with_peft_results(backend, loaded_in_4bit):
    """fp32 compute: the patched model's output and every gradient equal PEFT's to fp32 rounding,
    both 4-bit layer classes fused on every call. Would catch the 4-bit route computing a different
    base (wrong weight, bias, scaling) or not being taken."""
    peft = pytest.importorskip("peft")
    from lorakernels import patch_peft, peft_patch_stats, unpatch_peft

    model = _peft_4bit_mlp(peft, loaded_in_4bit, torch.float32)
    x = torch.randn(2, 5, 128)
    expected = run(model, x)
    report = patch_peft(model, backend=backend)
    assert len(report.patched) == 2 and not report.fallback_now and not report.not_patched, str(report)
    assert_same(run(model, x), expected, tol=1e-5)
    assert peft_patch_stats(model) == {"fused": 2, "fallback": {}, "layers": {
        "base_model.model.0": {"fused": 1}, "base_model.model.1": {"fused": 1}}}
    assert unpatch_peft(model) == 2
    assert_same(run(model, x), expected, tol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_peft_on_a_qlora_llama_matches_peft_to_bf16_rounding(backend):
    """QLoRA as people run it: a bf16 Llama with NF4 layers computing in bf16, fp32 adapters.
    PEFT rounds the base GEMM and the adapter term to bf16 separately; the fused kernel once. Would
    catch a 4-bit route that loses an adapter, a layer or the bf16 compute dtype."""
    peft = pytest.importorskip("peft")
    from lorakernels import patch_peft, peft_patch_stats

    model = peft_qlora_model(peft).train()
    ids = torch.randint(0, 97, (2, 9))

    def step():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    expected_loss, expected_grads = step()
    patch_peft(model, backend=backend)
    loss, grads = step()
    assert peft_patch_stats(model)["fused"] == 2 * len(TARGETS) and not peft_patch_stats(model)["fallback"]
    # Through two bf16 decoder layers the rounding difference moves the loss by ~4e-5 (relative) and
    # the adapter gradients by up to ~4% of each tensor's largest entry; a scaling 10% off moves
    # them by ~4e-4 and ~32% (measured on both backends).
    assert abs(loss.item() - expected_loss.item()) < 2e-4 * expected_loss.item()
    for name, grad in grads.items():
        expected = expected_grads[name]
        assert (grad - expected).abs().max() <= 0.06 * expected.abs().max(), name


def test_patch_peft_qlora_makes_bitsandbytes_first_call_state_changes():
    """bitsandbytes' Linear4bit settles its compute dtype (fp32 x: fp32) and casts its bias to it on its
    first call; the fused route does the same, so patched and unpatched layers end in one state."""
    peft = pytest.importorskip("peft")
    from lorakernels import patch_peft, peft_patch_stats

    states = []
    for patched in (False, True):
        model = _peft_4bit_mlp(peft, True, compute_dtype=torch.bfloat16)
        base = model.base_model.model[0].base_layer
        base.compute_type_is_set = False
        if patched:
            patch_peft(model, backend="torch")
        y = model(torch.randn(3, 128))
        states.append((base.compute_dtype, base.bias.dtype, y.dtype))
        if patched:
            assert peft_patch_stats(model)["fused"] == 2
    assert states[0] == states[1] == (torch.float32, torch.float32, torch.float32)


def test_patch_peft_qlora_never_dequantizes_the_weight():
    """The fused route hands the kernels the packed codes: bitsandbytes' dequantization is never
    called (forward or backward), and nothing of W's dense size is saved for backward. Would catch
    a route through Linear4bit's forward or a dense W built for the call."""
    peft = pytest.importorskip("peft")
    from lorakernels import patch_peft

    model = _peft_4bit_mlp(peft, True, torch.float32)
    patch_peft(model, backend="triton")
    x = torch.randn(6, 128, requires_grad=True)
    calls = []
    original = bnb.functional.dequantize_4bit
    bnb.functional.dequantize_4bit = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        layer = model.base_model.model[0]
        saved, y = saved_activation_bytes(lambda: layer(x), list(layer.parameters()))  # the codes are the layer's
        y.sum().backward()
    finally:
        bnb.functional.dequantize_4bit = original
    assert calls == []
    # Besides x: U, the seed and the scales' compressed state (~1.3 KiB), where a dense fp32 W is 32 KiB.
    assert saved - x.numel() * 4 < 2048, f"saved {saved} bytes"
    assert x.grad is not None


@pytest.mark.parametrize("case", ["x_narrowed_to_compute", "adapters_in_a_third_dtype", "autocast_in_another_dtype"])
def test_patch_peft_qlora_cases_the_kernels_do_not_compute_run_peft_forward(case):
    """Where PEFT's QLoRA forward computes otherwise, the patched layer calls it: PEFT's output
    exactly, the fallback reason counted. Would catch a route taken where it is not exact."""
    peft = pytest.importorskip("peft")
    from lorakernels import patch_peft, peft_patch_stats

    x_dtype, compute_dtype, adapter_dtype, autocast = torch.float32, torch.float32, None, None
    if case == "x_narrowed_to_compute":  # fp32 x, bf16 compute: PEFT's LoRA term sees the fp32 x
        compute_dtype = torch.bfloat16
    elif case == "adapters_in_a_third_dtype":  # bf16 x and adapters, fp32 compute
        x_dtype, adapter_dtype = torch.bfloat16, torch.bfloat16
    else:  # fp16 autocast over bf16 x and compute: bitsandbytes rounds x to bf16, then to fp16
        x_dtype, compute_dtype, autocast = torch.bfloat16, torch.bfloat16, torch.float16
    model = _peft_4bit_mlp(peft, True, compute_dtype, x_dtype=x_dtype, adapter_dtype=adapter_dtype)
    layer, x = model.base_model.model[0], torch.randn(4, 128, dtype=x_dtype)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        expected = layer(x)
        patch_peft(model, backend="torch")
        y = layer(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    reasons = peft_patch_stats(model)["layers"]["base_model.model.0"]
    assert list(reasons) != ["fused"] and all(r.startswith("dtypes:") for r in reasons), reasons


def test_patch_peft_qlora_falls_back_on_bitsandbytes_cpu_layout():
    """A weight bitsandbytes repacked into its CPU layout (eval mode, no gradients, AVX512-BF16 CPUs)
    is not the 4-bit format the kernels read: the route says so at patch time and per call."""
    peft = pytest.importorskip("peft")
    from lorakernels import _peft_linear, patch_peft

    model = _peft_4bit_mlp(peft, True, torch.float32)
    layer = model.base_model.model[0]
    layer.base_layer.weight.quant_state.packing_format_for_cpu = True
    report = patch_peft(model, backend="torch")
    reason = "4-bit base weight not quantized, or in bitsandbytes' CPU-packed layout"
    assert report.fallback_now == {"base_model.model.0": reason}
    assert _peft_linear.route(layer, torch.randn(2, 128), (), {}) == (None, reason)


def test_qlora_example_trains_saves_for_peft_and_merges(tmp_path, monkeypatch):
    """`python -m lorakernels.examples.qlora`: a model loaded in NF4 by transformers'
    BitsAndBytesConfig learns, its adapter loads in PEFT with the same logits to bf16 rounding, and
    the merged bf16 model computes the 4-bit model's logits to bf16 rounding. Would catch the
    README's QLoRA path breaking anywhere along the way. On the torch backend, as a CPU user runs it
    (through the Triton interpreter its steps take minutes; the 4-bit kernels have their own tests)."""
    pytest.importorskip("transformers")
    from lorakernels.examples.qlora import main

    monkeypatch.setenv("LORAKERNELS_BACKEND", "torch")
    result = main(["--steps", "12", "--output-dir", str(tmp_path / "adapter")])
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.4, losses
    four_bit, dense = result["weight_bytes"]
    assert 0.25 < four_bit / dense < 0.3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    # Logits of magnitude ~2-3: bf16 rounding is 2**-7 there; four roundings apart at most.
    if result["peft_max_diff"] is not None:
        assert result["peft_max_diff"] < 4 * 2**-7
    assert result["merged_max_diff"] < 4 * 2**-7
