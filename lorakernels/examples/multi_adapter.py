"""Several training jobs on one frozen base: three adapters, three tasks, one loop.

    python -m lorakernels.examples.multi_adapter [--steps 30]

Each step concatenates one batch per job and runs the model once in a mixed batch
(`lorakernels.mixed_batch`): every layer does its base GEMM once for all jobs and adds each
sequence's own adapter in the same fused pass; one backward gives every adapter the gradients
of its own rows, and each job steps its own optimizer. The same jobs trained one after another
(`set_adapter`, one job per model call) give the same losses (dropout 0): printed side by side.
The model is a small Llama-style decoder with random weights (no downloads); the tasks count
upward modulo the vocabulary in steps of 1, 2 and 3. Runs on a GPU, or on a CPU in seconds.
"""

import argparse

import torch
from torch import nn

from lorakernels import add_adapter, apply_lora, mixed_batch, set_adapter
from lorakernels.examples.finetune import TARGETS, VOCAB, tiny_llama_config
from lorakernels.model import lora_modules

JOBS = {"default": 1, "skip2": 2, "skip3": 3}  # adapter name -> the task's counting step
BATCH, SEQ = 4, 16


def job_batches(steps, device, seed=0):
    """{job: [one batch of token ids per step]}: sequences counting upward by the job's step."""
    generator = torch.Generator().manual_seed(seed)
    batches = {}
    for job, stride in JOBS.items():
        # Drawn on the CPU (the generator's device) whatever the default device, then moved.
        starts = [torch.randint(0, VOCAB, (BATCH, 1), generator=generator, device="cpu") for _ in range(steps)]
        batches[job] = [((s + stride * torch.arange(SEQ)) % VOCAB).to(device) for s in starts]
    return batches


def build(device, dtype):
    """The shared model with one rank-8 adapter per job (the first is the layers' own), and one
    AdamW per job over its adapter's parameters."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(device=device, dtype=dtype)
    apply_lora(model, TARGETS, r=8, lora_alpha=16, adapter_dtype=torch.float32)
    for job in list(JOBS)[1:]:
        add_adapter(model, job, r=8, lora_alpha=16)
    optimizers = {job: torch.optim.AdamW([p for _, layer in lora_modules(model)
                                          for p in layer.adapter_operands(job)[:2]], lr=3e-3)
                  for job in JOBS}
    return model.train(), optimizers


def _next_token_loss(logits, ids):
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train_together(steps, device, dtype=torch.float32):
    """Every job in one mixed batch per step; returns {job: [loss per step]}."""
    model, optimizers = build(device, dtype)
    batches, losses = job_batches(steps, device), {job: [] for job in JOBS}
    names = [job for job in JOBS for _ in range(BATCH)]  # one adapter name per sequence
    for step in range(steps):
        ids = torch.cat([batches[job][step] for job in JOBS])
        with mixed_batch(model, names):
            logits = model(ids).logits
        job_losses = {job: _next_token_loss(logits[i * BATCH:(i + 1) * BATCH], batches[job][step])
                      for i, job in enumerate(JOBS)}
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        sum(job_losses.values()).backward()  # the jobs' adapters are disjoint: each gets its own gradient
        for job, optimizer in optimizers.items():
            optimizer.step()
            losses[job].append(job_losses[job].item())
    return losses


def train_one_after_another(steps, device, dtype=torch.float32):
    """Each job alone, one after the other, on the same batches; returns {job: [loss per step]}."""
    model, optimizers = build(device, dtype)
    batches, losses = job_batches(steps, device), {job: [] for job in JOBS}
    for job, optimizer in optimizers.items():
        set_adapter(model, job)
        for ids in batches[job]:
            loss = _next_token_loss(model(ids).logits, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[job].append(loss.item())
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    together = train_together(args.steps, device)
    alone = train_one_after_another(args.steps, device)
    print(f"{device}: {len(JOBS)} jobs, {args.steps} steps; loss per job, trained together | one after another")
    for step in sorted({0, args.steps // 2, args.steps - 1}):
        cells = [f"{job} {together[job][step]:.4f} | {alone[job][step]:.4f}" for job in JOBS]
        print(f"step {step:3d}  " + "   ".join(cells))
    difference = max(abs(a - b) for job in JOBS for a, b in zip(together[job], alone[job]))
    print(f"largest loss difference between the two ways: {difference:.2e}")
    return together, alone


if __name__ == "__main__":
    main()
