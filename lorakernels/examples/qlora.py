"""QLoRA: fine-tune a Llama-style model loaded in 4 bits by transformers + bitsandbytes, save the
adapter in PEFT's format, check PEFT loads it, merge for export.

    python -m lorakernels.examples.qlora [--steps 40] [--output-dir DIR]

Needs transformers and bitsandbytes (`pip install -e '.[qlora,bench]'`; peft for the PEFT check).
A small model with random weights is saved to a temporary directory first (a stand-in for a
checkpoint from the Hub: no downloads), then loaded as a QLoRA user loads one:
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, NF4, double
quantization, bf16 compute))`. The adapters train on the counting task of
`lorakernels.examples.finetune`. Runs on a GPU, or on the CPU in well under a minute
(bitsandbytes quantizes and runs 4-bit layers on CPUs; lorakernels uses its torch backend there).
The adapter goes to --output-dir, by default a new temporary directory (printed).
"""

import argparse
import tempfile

import torch

from lorakernels import apply_lora, four_bit, merge_and_unload, save_adapter
from lorakernels.examples.finetune import TARGETS, VOCAB, counting_batch, tiny_llama_config, train_on_counting


def load_4bit(path, device):
    """The checkpoint at `path` loaded as QLoRA loads it: decoder Linear layers in NF4 (double
    quantization), computing in bf16; embeddings, norms and lm_head in bf16."""
    import transformers

    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                             device_map=device, dtype=torch.bfloat16)


def linear_weight_bytes(model):
    """(bytes of the 4-bit linear layers' weights with their quantization state, bytes of the same
    weights in bf16)."""
    layers = [m for m in model.modules() if four_bit.is_linear4bit(m)]
    return (sum(four_bit.storage_bytes(m.weight) for m in layers),
            sum(m.in_features * m.out_features * 2 for m in layers))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", default=None, help="where the adapter goes (default: a new temporary dir)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="qlora-adapter-")
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as checkpoint:
        transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=128)).to(torch.bfloat16).save_pretrained(checkpoint)
        model = load_4bit(checkpoint, device)
        reference_base = load_4bit(checkpoint, device)  # for PEFT: the same 4-bit model, not adapted

    packed, dense = linear_weight_bytes(model)
    print(f"{device}: decoder linear weights {packed / 2**10:.0f} KiB in NF4 (with scales) against "
          f"{dense / 2**10:.0f} KiB in bf16: {packed / dense:.3f} x")
    apply_lora(model, TARGETS, r=8, lora_alpha=16, lora_dropout=0.05)  # fp32 adapters, as PEFT's QLoRA
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable {trainable:,} parameters (the 4-bit weights stay frozen and packed)")
    losses = train_on_counting(model, args.steps, VOCAB, device)
    save_adapter(model, output_dir)
    print(f"adapter saved to {output_dir}/ (PEFT's files and keys)")

    model.eval()
    ids = counting_batch(4, 12, VOCAB, device)
    with torch.no_grad():
        adapted = model(ids).logits.float()
    result = dict(losses=losses, weight_bytes=(packed, dense))
    result["peft_max_diff"] = _check_in_peft(reference_base, output_dir, ids, adapted)
    merge_and_unload(model)  # 4-bit layers become bf16 nn.Linear: W dequantized + scaling * B A
    with torch.no_grad():
        merged = model(ids).logits.float()
    result["merged_max_diff"] = (merged - adapted).abs().max().item()
    print(f"merged for export (bf16 Linear layers): logits within {result['merged_max_diff']:.3g} of the 4-bit "
          f"model's (largest {adapted.abs().max().item():.3g}; bf16 rounding of the merged weights)")
    prompt = counting_batch(1, 6, VOCAB, device)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    print("prompt", prompt.tolist()[0], "-> generated", out[0, 6:].tolist())
    return result


def _check_in_peft(base, adapter_dir, ids, expected):
    """Load the saved adapter with PEFT onto the 4-bit model (PEFT's QLoRA layers) and compare logits;
    None without peft."""
    try:
        import peft
    except ImportError:
        print("peft is not installed: skipping the PEFT check")
        return None
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = peft_model(ids).logits.float()
    diff = (logits - expected).abs().max().item()
    print(f"PEFT loads the adapter onto the same 4-bit model: logits within {diff:.3g} of ours "
          f"(PEFT rounds the base GEMM and the LoRA term to bf16 separately)")
    return diff


if __name__ == "__main__":
    main()
