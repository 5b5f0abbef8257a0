"""Adapter files (PEFT format): round trip, and loading that validates everything before
touching the model (missing/unexpected keys, shape or rank mismatch, corrupt or truncated file).
"""

import json
import os

import pytest
import torch
from torch import nn

from lorakernels import LoRALinear, apply_lora, load_adapter, save_adapter

pytest.importorskip("safetensors")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(16, 12), "v_proj": nn.Linear(16, 12), "out": nn.Linear(12, 16)})
            for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block["out"](block["q_proj"](x) * block["v_proj"](x).sigmoid())
        return x


def adapted_toy(seed=0, r=4):
    torch.manual_seed(seed)
    model = apply_lora(Toy(), ["q_proj", "v_proj"], r=r, lora_alpha=8, use_rslora=True)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def assert_unchanged(model, before):
    state, types = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_round_trip_in_peft_format(tmp_path):
    model = adapted_toy()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is True
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.q_proj.lora_A.weight" in keys and len(keys) == 8

    torch.manual_seed(0)
    fresh = Toy()  # same base weights (same seed), no adapters yet
    load_adapter(fresh, tmp_path)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x))
    loaded = fresh.blocks[1]["v_proj"]
    assert isinstance(loaded, LoRALinear) and loaded.scaling == model.blocks[1]["v_proj"].scaling == 4.0


def _rewrite(tmp_path, edit):
    from safetensors.torch import load_file, save_file
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize("case, message", [
    ("missing", r"missing \['blocks.1.v_proj.lora_B'\]"),
    ("unexpected", r"unexpected \['blocks.0.out.lora_A'\]"),
    ("shape", r"blocks.0.q_proj.lora_A has shape \(4, 15\).*need \(4, 16\)"),
    ("rank", r"rank 4 does not match .*blocks.0.q_proj \(r = 2\)"),
    ("truncated", r"corrupt or truncated"),
    ("no_config", r"cannot read the adapter config"),
    ("dora", r"unsupported LoRA options \{'use_dora': True\}"),
])
def test_bad_adapter_files_leave_the_model_unchanged(tmp_path, case, message):
    save_adapter(adapted_toy(), tmp_path)
    target = adapted_toy(seed=1, r=2) if case == "rank" else adapted_toy(seed=1)
    if case == "missing":
        _rewrite(tmp_path, lambda t: t.pop("base_model.model.blocks.1.v_proj.lora_B.weight"))
    elif case == "unexpected":
        _rewrite(tmp_path, lambda t: t.update({"base_model.model.blocks.0.out.lora_A.weight": torch.zeros(4, 12)}))
    elif case == "shape":
        _rewrite(tmp_path, lambda t: t.update({"base_model.model.blocks.0.q_proj.lora_A.weight": torch.zeros(4, 15)}))
    elif case == "truncated":
        file = tmp_path / "adapter_model.safetensors"
        file.write_bytes(file.read_bytes()[: os.path.getsize(file) // 2])
    elif case == "no_config":
        (tmp_path / "adapter_config.json").unlink()
    elif case == "dora":
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_load_refuses_pickles(tmp_path):
    """Only safetensors are read: a PyTorch pickle next to the config is never opened."""
    save_adapter(adapted_toy(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter weights not found.*only safetensors"):
        load_adapter(Toy(), tmp_path)
