"""Fine-tune a small Llama-style model with LoRA on a synthetic task, then merge and save.

    python -m lorakernels.examples.finetune [--steps 60] [--output-dir DIR]

The model is built from a transformers config with random weights (no downloads). The task:
predict the next token of sequences that count upward modulo the vocabulary, which the
random model cannot do and a rank-8 adapter on the attention and MLP projections learns
in a few dozen steps. Runs on a GPU as is (bf16), or on the CPU in well under a minute.
The adapter goes to --output-dir, by default a new temporary directory (printed at the end).
"""

import argparse
import tempfile
import time

import torch

from lorakernels import apply_lora, merge_and_unload, save_adapter

# The examples' model: a 2-layer Llama with random weights, adapters on every projection.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama_config(hidden_size=64):
    import transformers

    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64)


def counting_batch(batch, seq, vocab, device):
    start = torch.randint(0, vocab, (batch, 1), device=device)
    return (start + torch.arange(seq, device=device)) % vocab


def train_on_counting(model, steps, vocab, device, lr=3e-3):
    """AdamW on the model's trainable parameters over `steps` counting batches (16 x 24 tokens),
    printing the loss every 10 steps; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    model.train()
    losses = []
    for step in range(steps):
        ids = counting_batch(16, 24, vocab, device)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {losses[-1]:.3f}")
    print(f"trained in {time.perf_counter() - start:.1f} s")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default=None, help="where the adapter goes (default: a new temporary dir)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="lora-adapter-")
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(device=device, dtype=dtype)
    apply_lora(model, TARGETS, r=8, lora_alpha=16, lora_dropout=0.05, adapter_dtype=torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{device}: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%)")
    losses = train_on_counting(model, args.steps, VOCAB, device)
    save_adapter(model, output_dir)
    model.eval()
    merge_and_unload(model)
    prompt = counting_batch(1, 6, VOCAB, device)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    print("prompt", prompt.tolist()[0], "-> generated", out[0, 6:].tolist())
    print(f"adapter saved to {output_dir}/")
    return losses[-1]


if __name__ == "__main__":
    main()
