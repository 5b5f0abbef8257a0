"""Several adapters on one model: PEFT's vocabulary on LoRALinear and the model, mixed batches in
one fused pass per layer, and several training jobs in one loop over the shared base.

Would catch: mixed-batch logits that differ from PEFT's `adapter_names` path, a sequence reaching
another adapter, an adapter without rows getting a (zero) gradient, jobs trained together that
drift from the same jobs trained one after another, and adapter bookkeeping that half-applies.
"""

import copy

import pytest
import torch
from torch import nn

from lorakernels import LoRALinear, add_adapter, apply_lora, delete_adapter, mixed_batch, set_adapter
from lorakernels.model import lora_modules

transformers = pytest.importorskip("transformers")
from tests.test_model import tiny_llama  # noqa: E402
from tests.utils import DEVICE  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXTRA = {"b": dict(r=8, lora_alpha=4), "c": dict(r=2, lora_alpha=2, use_rslora=True)}


def _three_adapter_llama(seed=0):
    """A tiny Llama with adapters default (r 4), b (r 8), c (r 2, rsLoRA), all with random lora_B."""
    model = apply_lora(tiny_llama(), TARGETS, r=4, lora_alpha=8)
    for name, kwargs in EXTRA.items():
        add_adapter(model, name, **kwargs)
    torch.manual_seed(seed)
    for _, layer in lora_modules(model):
        for name in layer.adapter_names:
            nn.init.normal_(layer.adapter_operands(name)[1], std=0.05)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_equals_each_sequence_through_its_adapter(backend):
    model = _three_adapter_llama()
    for _, layer in lora_modules(model):
        layer.backend = backend
    ids = torch.randint(0, 97, (4, 6))
    names = ["c", "__base__", "default", "b"]
    with torch.no_grad(), mixed_batch(model, names):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                for _, layer in lora_modules(model):
                    layer.adapters_disabled = True
            else:
                set_adapter(model, name)
            alone = model(ids[i:i + 1]).logits
            for _, layer in lora_modules(model):
                layer.adapters_disabled = False
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5, msg=name)
    assert all(layer.batch_adapter_names is None for _, layer in lora_modules(model))  # the block cleans up


def test_mixed_batch_logits_match_peft_adapter_names():
    """PEFT's mixed-batch inference (`adapter_names=`) on a tiny Llama with three adapters of different
    ranks and scalings, against the same adapters in lorakernels: the same logits to fp32 rounding."""
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                          init_lora_weights=False))
    for name, kwargs in EXTRA.items():
        peft_model.add_adapter(name, peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kwargs))
    peft_model.eval()
    ours = apply_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    for name, kwargs in EXTRA.items():
        add_adapter(ours, name, **kwargs)
    with torch.no_grad():
        for layer_name, layer in lora_modules(ours):
            theirs = peft_model.base_model.model.get_submodule(layer_name)
            for adapter in layer.adapter_names:
                A, B, scaling, _ = layer.adapter_operands(adapter)
                A.copy_(theirs.lora_A[adapter].weight)
                B.copy_(theirs.lora_B[adapter].weight)
                assert scaling == pytest.approx(theirs.scaling[adapter])
    ids = torch.randint(0, 97, (4, 7))
    names = ["b", "__base__", "c", "default"]
    with torch.no_grad():
        expected = peft_model(ids, adapter_names=names).logits
        with mixed_batch(ours, names):
            got = ours(ids).logits
        base_logits = base(ids).logits
    assert (expected - base_logits)[[0, 2, 3]].abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_with_rows_get_gradients():
    model = _three_adapter_llama().train()
    ids = torch.randint(0, 97, (3, 5))
    with mixed_batch(model, ["b", "__base__", "b"]):
        model(ids, labels=ids).loss.backward()
    for _, layer in lora_modules(model):
        for name in layer.adapter_names:
            A, B, _, _ = layer.adapter_operands(name)
            if name == "b":
                assert A.grad is not None and B.grad is not None and B.grad.abs().max() > 0
            else:
                assert A.grad is None and B.grad is None, name  # no rows: not even a zero gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_jobs_trained_in_one_loop_match_jobs_trained_one_after_another(backend, monkeypatch):
    """`python -m lorakernels.examples.multi_adapter`: three adapters with their own optimizers on
    three tasks, one mixed batch per step over the shared base, give the losses of the same jobs
    trained one after another (dropout 0), and every job's loss goes down."""
    from lorakernels.examples import multi_adapter

    monkeypatch.setenv("LORAKERNELS_BACKEND", backend)
    steps = 6 if backend == "torch" else 2  # the interpreter is slow; two steps still include an update
    # On the device under test, with the CPU as the default device, as `python -m` runs the example:
    # it moves what it builds to the device it is given.
    with torch.device("cpu"):
        together = multi_adapter.train_together(steps, DEVICE)
        alone = multi_adapter.train_one_after_another(steps, DEVICE)
    for job in multi_adapter.JOBS:
        assert together[job] == pytest.approx(alone[job], rel=1e-5, abs=1e-6), job
        assert together[job][-1] < together[job][0], job


def test_adapter_bookkeeping_errors_change_nothing():
    model = _three_adapter_llama()
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.adapter_names == ["default", "b", "c"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has an adapter 'b' already"):
        add_adapter(model, "b")
    with pytest.raises(ValueError, match="no adapter 'zzz'"):
        set_adapter(model, "zzz")
    with pytest.raises(ValueError, match="only adapter"):
        LoRALinear(8, 8).delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter 'nope' on this layer"):
        layer.delete_adapter("nope")
    with pytest.raises(ValueError, match=r"holds adapter\(s\) \['nope'\]"), mixed_batch(model, ["b", "nope"]):
        pass
    with pytest.raises(ValueError, match="r must be"):
        add_adapter(model, "d", r=0)
    model.model.layers[1].mlp.down_proj.merge()
    with pytest.raises(RuntimeError, match="merged"):
        set_adapter(model, "b")
    with pytest.raises(RuntimeError, match="merged"):
        add_adapter(model, "d")
    model.model.layers[1].mlp.down_proj.unmerge()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all("d" not in layer.adapter_names for _, layer in lora_modules(model))
    assert all(layer.active_adapter == "default" for _, layer in lora_modules(model))
    delete_adapter(model, "c")
    assert layer.adapter_names == ["default", "b"]
    set_adapter(model, "b")
    delete_adapter(model, "b")
    assert layer.active_adapter == "default"


def test_several_adapters_saved_in_peft_layout_load_in_peft_and_back(tmp_path):
    """`save_adapters` writes PEFT's layout (default in the directory, the others in subdirectories);
    PEFT loads each (`from_pretrained`, `load_adapter`) and gives our mixed-batch logits;
    `load_adapter(..., adapter_name=)` brings them back into a fresh model, bit for bit."""
    peft = pytest.importorskip("peft")
    from lorakernels import load_adapter, save_adapters

    ours = _three_adapter_llama()
    assert save_adapters(ours, tmp_path) == ["default", "b", "c"]
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "b" / "adapter_config.json").exists()
    ids = torch.randint(0, 97, (3, 6))
    names = ["c", "b", "default"]
    with torch.no_grad(), mixed_batch(ours, names):
        expected = ours(ids).logits

    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name in EXTRA:
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids, adapter_names=names).logits, expected, rtol=1e-5, atol=1e-5)

    fresh = load_adapter(tiny_llama(), tmp_path)
    for name in EXTRA:
        load_adapter(fresh, tmp_path / name, adapter_name=name)
    for (_, mine), (_, theirs) in zip(lora_modules(ours), lora_modules(fresh)):
        assert theirs.adapter_names == mine.adapter_names and theirs.active_adapter == "default"
        for name in mine.adapter_names:
            assert mine.adapter_config(name) == theirs.adapter_config(name)
            for a, b in zip(mine.adapter_operands(name)[:2], theirs.adapter_operands(name)[:2]):
                assert torch.equal(a, b) and b.requires_grad
    with torch.no_grad(), mixed_batch(fresh, names):
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)


def test_save_adapters_writes_nothing_when_a_later_adapter_cannot_be_saved(tmp_path):
    """Every adapter is built and checked before any file is written: an adapter ("z", saved after
    "default") whose layers disagree on r is refused and leaves the directory empty. Would catch
    `save_adapters` writing the default adapter before finding that the next one cannot be saved."""
    from lorakernels import save_adapters

    model = apply_lora(tiny_llama(), TARGETS, r=4, lora_alpha=8)
    for i, (_, layer) in enumerate(lora_modules(model)):
        layer.add_adapter("z", r=2 + 2 * (i % 2), lora_alpha=4)
    with pytest.raises(ValueError, match="r"):
        save_adapters(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_adapter_refuses_a_bad_adapter_name_before_reading_files(tmp_path):
    from lorakernels import load_adapter

    with pytest.raises(ValueError, match="adapter name 'two.words' contains '.'"):
        load_adapter(tiny_llama(), tmp_path / "not-read", adapter_name="two.words")
