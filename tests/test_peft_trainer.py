"""End to end with transformers' Trainer: a tiny Llama with PEFT LoRA on every linear layer,
20 training steps from one seed, patched (`lorakernels.patch_peft`) and not. Would catch a patch
that changes the training trajectory (losses), what the optimizer updates, or the adapter that
`save_pretrained` writes; and one that the Trainer's wrapping bypasses (no fused call)."""

import pytest
import torch

from lorakernels import patch_peft, peft_patch_stats
from tests.test_model import tiny_llama
from tests.utils import DEVICE

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

STEPS = 20


class CountingData(torch.utils.data.Dataset):
    """Token sequences that count upward from a random start (a pattern a LoRA can learn)."""

    def __init__(self, n=64, length=12, vocab=97):
        # A dataset lives on the CPU (the Trainer moves each batch to its device).
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(3), device="cpu")
        self.ids = (starts + torch.arange(length, device="cpu")) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossRecordingTrainer(transformers.Trainer):
    """Keeps every step's loss unrounded (the Trainer's log rounds it to 4 decimals)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        self.losses.append((result[0] if return_outputs else result).item())
        return result


def train(tmp_path, patched, backend):
    """(losses of every step, saved adapter tensors, fused calls), trained on the device under test.

    Run as a training script runs it, with the CPU as the default device: the Trainer moves the
    model and each batch to its device itself, and what it creates without naming a device stays on
    the CPU (its sampler draws a permutation with a CPU generator, which a CUDA default device
    refuses: torch.utils.data.RandomSampler)."""
    with torch.device("cpu"):
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        model = peft.get_peft_model(tiny_llama(seed=0).train(), config)
        if patched:
            assert len(patch_peft(model, backend=backend).patched) == 14  # 7 linears x 2 decoder layers
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
            save_strategy="no", report_to=[], seed=0, use_cpu=DEVICE.type == "cpu", disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = LossRecordingTrainer(model=model, args=args, train_dataset=CountingData())
        trainer.train()
        assert {p.device.type for p in model.parameters()} == {DEVICE.type}  # trained where the suite runs
        model.save_pretrained(tmp_path / "adapter")
    adapter = safetensors_torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    return trainer.losses, adapter, peft_patch_stats(model)["fused"]


def test_trainer_patched_matches_peft(tmp_path):
    # The torch backend (1 s; the Triton kernels through the interpreter take ~30 s here, and
    # tests/test_peft_patch.py checks them against PEFT layer by layer).
    losses, adapter, _ = train(tmp_path / "peft", patched=False, backend=None)
    p_losses, p_adapter, fused = train(tmp_path / "patched", patched=True, backend="torch")
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it trained
    assert fused == 14 * STEPS  # every LoRA layer fused on every step
    torch.testing.assert_close(torch.tensor(p_losses), torch.tensor(losses), rtol=1e-5, atol=0)
    assert p_adapter.keys() == adapter.keys()
    for key, tensor in adapter.items():
        torch.testing.assert_close(p_adapter[key], tensor, rtol=1e-5, atol=1e-5 * tensor.abs().max().item(),
                                   msg=lambda m: f"{key}: {m}")
