"""Adapters over different layer sets, and PEFT's adapter names, against PEFT itself.

A PEFT model holds adapter "a" on q_proj and v_proj and adapter "b" on q_proj, v_proj and
o_proj; lorakernels loads both files. PEFT's rules, which lorakernels must follow: a layer that
lacks the active adapter runs as its base layer; loading never changes which adapter is active;
the rows of a mixed batch naming an adapter a layer lacks take the base on that layer. And any
name PEFT accepts ("math-v2", "two words", ...) saves, loads, activates, mixes and deletes.

Would catch: a load that makes the adapter it loads active on the layers it wraps (logits of "a"
on q/v plus "b" on o_proj), set_adapter or mixed_batch refusing an adapter some layers lack,
merging a layer that lacks the active adapter, names PEFT accepts refused (or names it refuses
taken), and `save_adapters` writing outside its directory.
"""

import copy

import pytest
import torch

from lorakernels import (
    add_adapter,
    apply_lora,
    delete_adapter,
    load_adapter,
    merge_and_unload,
    merge_lora,
    mixed_batch,
    save_adapters,
    set_adapter,
    unmerge_lora,
)
from lorakernels.model import active_adapter, lora_modules
from lorakernels.modules import check_adapter_name

peft = pytest.importorskip("peft")
from tests.test_model import tiny_llama  # noqa: E402

SETS = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"])}
BACKENDS = ["torch", "triton"]  # triton: the kernels, through the interpreter on CPU


@pytest.fixture(scope="module")
def saved_sets(tmp_path_factory):
    """PEFT's adapters "a" and "b" (random lora_B), saved by PEFT: the directory (a/ and b/)."""
    path = tmp_path_factory.mktemp("sets")
    torch.manual_seed(1)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **SETS["a"]), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **SETS["b"]))
    model.save_pretrained(path)
    return path


def peft_sets(path):
    """PEFT's model as a user loads the two adapters: "a" first (active), then "b"."""
    model = peft.PeftModel.from_pretrained(tiny_llama(), path / "a", adapter_name="a")
    model.load_adapter(path / "b", adapter_name="b")
    return model.eval()


def our_sets(path, backend):
    model = load_adapter(tiny_llama(), path / "a", adapter_name="a", backend=backend)
    return load_adapter(model, path / "b", adapter_name="b", backend=backend)


def logits(model, ids, adapter_names=None):
    with torch.no_grad():
        if adapter_names is None or isinstance(model, peft.PeftModel):
            kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
            return model(ids, **kwargs).logits
        with mixed_batch(model, adapter_names):
            return model(ids).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_an_adapter_over_more_layers_leaves_the_active_one(saved_sets, backend):
    theirs, ours = peft_sets(saved_sets), our_sets(saved_sets, backend)
    layers = dict(lora_modules(ours))
    assert layers["model.layers.0.self_attn.o_proj"].adapter_names == ["b"]
    assert {layer.active_adapter for layer in layers.values()} == {"a"} and active_adapter(ours) == "a"
    ids = torch.randint(0, 97, (2, 5))
    expected = logits(theirs, ids)
    assert (expected - logits(tiny_llama(), ids)).abs().max() > 1e-2  # adapter "a" matters
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


def test_set_adapter_and_merging_where_layers_lack_the_adapter(saved_sets):
    """set_adapter accepts an adapter that only some layers hold (PEFT's set_adapter), the others
    run their base; merging such a model folds nothing into those layers, and unmerging restores
    every weight bit for bit."""
    theirs, ours = peft_sets(saved_sets), our_sets(saved_sets, "torch")
    ids = torch.randint(0, 97, (2, 5))
    weights = {name: layer.weight.clone() for name, layer in lora_modules(ours)}
    for name in ("b", "a"):
        theirs.set_adapter(name)
        set_adapter(ours, name)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5, msg=name)
        merge_lora(ours)
        assert all(layer.merged for _, layer in lora_modules(ours))
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5, msg=name)
        unmerge_lora(ours)
        assert all(torch.equal(layer.weight, weights[n]) for n, layer in lora_modules(ours))
    with pytest.raises(ValueError, match=r"no adapter 'c' on any LoRALinear layer"):
        set_adapter(ours, "c")
    assert active_adapter(ours) == "a"
    expected = logits(theirs, ids)
    torch.testing.assert_close(logits(merge_and_unload(ours), ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_rows_of_an_adapter_a_layer_lacks_take_its_base(saved_sets, backend):
    theirs, ours = peft_sets(saved_sets), our_sets(saved_sets, backend)
    ids = torch.randint(0, 97, (4, 5))
    names = ["b", "a", "__base__", "a"]
    expected = logits(theirs, ids, names)
    torch.testing.assert_close(logits(ours, ids, names), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(ours, ids[1:2], ["a"]), expected[1:2], rtol=1e-5, atol=1e-5)  # o_proj: base only
    with pytest.raises(ValueError, match=r"no LoRALinear layer of LlamaForCausalLM holds adapter\(s\) \['c'\]"):
        logits(ours, ids, ["a", "c", "b", "a"])
    with pytest.raises(TypeError, match="list of adapter names"):
        logits(ours, ids, "abba")
    assert all(layer.batch_adapter_names is None for _, layer in lora_modules(ours))


def test_deleting_adapters_follows_peft(saved_sets):
    """Deleting "a" (q/v's own adapter, active, lacking on o_proj) leaves "b" everywhere, active on
    every layer as in PEFT; deleting "b" then leaves the base model (o_proj and q/v become plain
    nn.Linear layers again, sharing their weights)."""
    theirs, ours = peft_sets(saved_sets), our_sets(saved_sets, "torch")
    ids = torch.randint(0, 97, (2, 5))
    q_proj = ours.model.layers[0].self_attn.q_proj
    q_weight, b_factors = q_proj.weight, q_proj.adapter_operands("b")[:2]
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        theirs.delete_adapter("a")
    delete_adapter(ours, "a")
    assert [(layer.adapter_names, layer.active_adapter) for _, layer in lora_modules(ours)] == [(["b"], "b")] * 6
    assert q_proj.lora_A is b_factors[0] and q_proj.lora_B is b_factors[1]  # the same parameters, now its own
    assert q_proj.scaling == 2.0 and q_proj.r == 2
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
    delete_adapter(ours, "b")
    assert not lora_modules(ours) and type(ours.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert ours.model.layers[0].self_attn.q_proj.weight is q_weight
    torch.testing.assert_close(logits(ours, ids), logits(tiny_llama(), ids), rtol=0, atol=0)


def test_deleting_the_active_adapter_resets_the_layers_that_lack_it(saved_sets):
    ours = our_sets(saved_sets, "torch")
    for name, layer in lora_modules(ours):
        if name.endswith("q_proj"):
            layer.add_adapter("c", r=2)
    set_adapter(ours, "c")  # v_proj and o_proj lack it: they run their base
    state = copy.deepcopy(ours.state_dict())
    ours.model.layers[1].self_attn.v_proj.merge()
    with pytest.raises(RuntimeError, match="merged"):
        delete_adapter(ours, "c")  # v_proj would switch adapters while merged
    ours.model.layers[1].self_attn.v_proj.unmerge()
    assert all(torch.equal(value, ours.state_dict()[key]) for key, value in state.items())
    delete_adapter(ours, "c")  # every layer back to its own adapter: "a" on q/v, "b" on o_proj
    assert [layer.active_adapter for _, layer in lora_modules(ours)] == ["a", "a", "b"] * 2


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
def test_a_layer_without_its_active_adapter_is_its_base_layer(four_bit):
    """What the model-level functions leave on a layer that lacks the model's active adapter:
    forward, merged_linear and merge compute the base layer (dense and 4-bit bases)."""
    from lorakernels import LoRALinear

    if four_bit:
        pytest.importorskip("bitsandbytes")
        from tests.test_qlora import linear4bit

        base = linear4bit(64, 32, compute_dtype=torch.float32)
    else:
        base = torch.nn.Linear(64, 32)
    layer = LoRALinear.from_linear(base, r=4, backend="torch")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 64)
    layer.adapters_disabled = True
    expected = layer(x)
    layer.adapters_disabled = False
    assert (layer(x) - expected).abs().max() > 1e-3  # its own adapter matters
    layer.active_adapter = "elsewhere"  # as set_adapter(model, "elsewhere") leaves it
    assert layer.active_operands() is None
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.merged_linear()(x), expected, rtol=1e-6, atol=1e-6)
    if not four_bit:
        weight = layer.weight.clone()
        layer.merge()
        assert layer.merged and torch.equal(layer.weight, weight)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        layer.unmerge()
        assert not layer.merged and torch.equal(layer.weight, weight)


# --- PEFT's adapter names -----------------------------------------------------------------------------


NAMES = ["math-v2", "two words", "a/b", "__base__"]


@pytest.mark.parametrize("name", NAMES)
def test_any_name_peft_accepts_round_trips(tmp_path, name):
    """A PEFT model with adapters "default" and `name` saved by PEFT loads here under those names;
    set_adapter, mixed batches (where "__base__" is the base, as in PEFT), save_adapters (PEFT's
    layout, loaded by PEFT) and delete_adapter all follow PEFT."""
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    theirs.add_adapter(name, peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(), tmp_path / "peft", backend="torch")
    load_adapter(ours, tmp_path / "peft" / name, adapter_name=name)
    theirs.eval().set_adapter(name)
    set_adapter(ours, name)
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
    names = [name, "default"]
    torch.testing.assert_close(logits(ours, ids, names), logits(theirs, ids, names), rtol=1e-5, atol=1e-5)

    assert save_adapters(ours, tmp_path / "ours") == ["default", name]
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    again.load_adapter(tmp_path / "ours" / name, adapter_name=name)
    again.eval().set_adapter(name)
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)

    delete_adapter(ours, name)
    theirs.delete_adapter(name)
    assert all(layer.adapter_names == ["default"] for _, layer in lora_modules(ours))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, error", [("a.b", ValueError), ("", ValueError), ("training", ValueError),
                                         ("keys", ValueError), (3, TypeError), (b"x", TypeError)])
def test_names_peft_refuses_are_refused_and_change_nothing(tmp_path, name, error):
    # PEFT keeps adapters in nn.ModuleDicts: it refuses these (KeyError there).
    with pytest.raises(error, match="adapter name"):
        check_adapter_name(name)
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match="adapter name"):
        load_adapter(model, tmp_path / "not-read", adapter_name=name)
    assert model.state_dict().keys() == state.keys() and not lora_modules(model)


def test_save_adapters_refuses_a_name_leading_out_of_its_directory(tmp_path):
    elsewhere = str(tmp_path / "elsewhere")  # an absolute path as a name: PEFT's save_pretrained writes there
    if "." in elsewhere:
        pytest.skip(f"the temporary directory {elsewhere} holds a '.', which no adapter name can")
    ours = apply_lora(tiny_llama(), ["q_proj"], r=2)
    add_adapter(ours, elsewhere)
    with pytest.raises(ValueError, match="cannot be saved in a directory of its name"):
        save_adapters(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()
