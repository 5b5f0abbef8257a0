"""Adapter files (PEFT format): round trip, and loading that validates everything before
touching the model (missing/unexpected keys, shape or rank mismatch, corrupt or truncated file,
flipped bytes, config and weights from different saves, config values of the wrong type or range,
whether or not the model already has LoRA layers); saving over an adapter that fails part-way
leaves the old adapter whole.
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


def adapted_toy(seed=0, r=4, lora_alpha=8):
    torch.manual_seed(seed)
    model = apply_lora(Toy(), ["q_proj", "v_proj"], r=r, lora_alpha=lora_alpha, use_rslora=True)
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


def adapter_of(model):
    """Per LoRA layer: its tensors and the hyperparameters loading sets."""
    return {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scaling, m.lora_dropout, m.use_rslora)
            for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def assert_same_adapter(model, expected):
    got, want = adapter_of(model), adapter_of(expected)
    assert set(got) == set(want)
    for name in want:
        assert all(torch.equal(g, w) for g, w in zip(got[name][:2], want[name][:2])), name
        assert got[name][2:] == want[name][2:], name


def loaded(path):
    torch.manual_seed(1)
    return load_adapter(Toy(), path)


def _fail_on_calls(monkeypatch, name, first, exc, last=None):
    """Make os.<name> raise `exc` on calls first..last (1-based; last None: every later call)."""
    real, calls = getattr(os, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= first and (last is None or calls[0] <= last):
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(os, name, patched)


def _failing_open(real_open):
    def patched(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)
    return patched


@pytest.mark.parametrize("failure", ["serialise", "write_config", "base_model_type", "first_replace",
                                     "second_replace", "interrupt"])
def test_failed_save_leaves_the_old_adapter_whole(tmp_path, monkeypatch, failure):
    """Would catch: weights replaced before the config is known to serialise, a config truncated in place,
    new weights left beside the old config when the config rename fails."""
    old = adapted_toy(seed=0)
    save_adapter(old, tmp_path)
    new, base = adapted_toy(seed=1, lora_alpha=16), None
    expected = (TypeError, OSError, KeyboardInterrupt)
    with monkeypatch.context() as patch:
        if failure == "serialise":
            patch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(TypeError("not serialisable")))
        elif failure == "write_config":
            patch.setattr("builtins.open", _failing_open(open))
        elif failure == "base_model_type":
            base = 3
        elif failure in ("first_replace", "second_replace"):
            _fail_on_calls(patch, "replace", 1 if failure == "first_replace" else 2, OSError(5, "I/O error"), last=2)
        else:
            _fail_on_calls(patch, "replace", 2, KeyboardInterrupt(), last=2)
        with pytest.raises(expected):
            save_adapter(new, tmp_path, base_model_name_or_path=base)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same_adapter(loaded(tmp_path), old)


@pytest.mark.parametrize("same_config", [False, True])
def test_save_killed_between_the_renames_never_loads_a_mix(tmp_path, monkeypatch, same_config):
    """A kill between the weights' and the config's rename (here: the undo fails too) leaves new weights
    beside the old config. Would catch: that pair loading as new weights with old hyperparameters."""
    old = adapted_toy(seed=0)
    save_adapter(old, tmp_path)
    new = adapted_toy(seed=1, lora_alpha=8 if same_config else 16)
    with monkeypatch.context() as patch:
        _fail_on_calls(patch, "replace", 2, OSError(5, "I/O error"))
        with pytest.raises(OSError, match=r"could not undo it.*previous weights are kept in .*\.old"):
            save_adapter(new, tmp_path)
    if same_config:  # the two configs agree in every field loading reads: the pair is the new adapter
        assert_same_adapter(loaded(tmp_path), new)
    else:
        with pytest.raises(ValueError, match=r"adapter_config.json and .*adapter_model.safetensors come from "
                                             r"different saves"):
            loaded(tmp_path)


def test_save_over_an_adapter_with_a_path_as_base_model(tmp_path):
    """Would catch: a pathlib.Path base_model_name_or_path breaking the config after the weights were replaced."""
    save_adapter(adapted_toy(seed=0), tmp_path)
    new = adapted_toy(seed=1, lora_alpha=16)
    save_adapter(new, tmp_path, base_model_name_or_path=tmp_path / "base")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")
    assert_same_adapter(loaded(tmp_path), new)


def test_flipped_byte_in_tensor_data_is_refused(tmp_path):
    """Would catch: loading silently accepting corrupted tensor bytes (safetensors has no checksum)."""
    save_adapter(adapted_toy(), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    data[data_start + 5] ^= 0x01
    file.write_bytes(bytes(data))
    target = Toy()
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"{file}.*fails its integrity check"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_config_and_weights_from_different_saves_are_refused(tmp_path):
    """Would catch: a config from one save loaded with the weights of another (other lora_alpha)."""
    save_adapter(adapted_toy(seed=0), tmp_path / "a")
    save_adapter(adapted_toy(seed=1, lora_alpha=16), tmp_path / "b")
    (tmp_path / "a" / "adapter_config.json").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
    target = Toy()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"come from different saves"):
        load_adapter(target, tmp_path / "a")
    assert_unchanged(target, before)


def test_files_without_digests_still_load(tmp_path):
    """PEFT writes no digests. Would catch: the integrity check refusing files that have none."""
    model = adapted_toy()
    save_adapter(model, tmp_path)
    _rewrite(tmp_path, lambda t: None)  # plain safetensors save_file: no metadata
    assert_same_adapter(loaded(tmp_path), model)


NAN = float("nan")
BAD_CONFIGS = [
    ("use_rslora", "false"), ("use_rslora", 1), ("lora_dropout", 1.0), ("lora_dropout", -0.1),
    ("lora_dropout", "0.1"), ("lora_dropout", True), ("lora_dropout", None), ("r", "4"), ("r", 4.0), ("r", True),
    ("r", 0), ("r", 1000), ("lora_alpha", "8"), ("lora_alpha", True), ("lora_alpha", NAN), ("lora_alpha", None),
    ("target_modules", "q_proj("), ("target_modules", []), ("target_modules", [1]), ("target_modules", [""]),
    ("target_modules", {"q_proj": True}), ("target_modules", None), ("peft_type", 5), ("peft_type", "LOHA"),
    ("use_dora", "false"), ("fan_in_fan_out", 0), ("bias", False), ("rank_pattern", ["q_proj"]),
    ("modules_to_save", "lm_head"), ("alora_invocation_tokens", [1, 2]), ("exclude_modules", ["q_proj"]),
    (None, ["not", "an", "object"]),
]


@pytest.mark.parametrize("state", ["plain", "adapted"])
@pytest.mark.parametrize("key, value", BAD_CONFIGS, ids=[f"{k}={v!r}" for k, v in BAD_CONFIGS])
def test_bad_config_values_are_refused_whatever_the_model_state(tmp_path, state, key, value):
    """Would catch: a string "false" read as true, lora_dropout 1.0 accepted into an adapted model (every
    later forward raising), AttributeError / re.error / TypeError instead of a ValueError naming the file,
    the key and the value, and a model changed by a failed load."""
    save_adapter(adapted_toy(), tmp_path)
    file = tmp_path / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps(value if key is None else {**config, key: value}))
    torch.manual_seed(1)
    target = adapted_toy(seed=1) if state == "adapted" else Toy()
    before = snapshot(target)
    with pytest.raises(ValueError) as info:
        load_adapter(target, tmp_path)
    message = str(info.value)
    assert str(file) in message
    if key is not None:
        assert repr(key) in message and repr(value) in message, message
    assert_unchanged(target, before)
