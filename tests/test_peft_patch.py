"""`patch_peft`: PEFT models routed through the fused kernels, and PEFT's behaviour everywhere else.

Would catch: a fused call that differs from PEFT's forward (scaling, rsLoRA, bias, dtypes,
autocast, 3-D inputs, adapter switching), a case routed that PEFT computes differently (DoRA,
LoRA bias, several adapters, mixed batches, merged or disabled adapters, a non-Linear base,
hooks), dropout with the wrong p or in eval mode, a graph break under torch.compile,
checkpoint recompute drawing a new mask, and patching that changes what PEFT saves or unloads.
"""

import copy

import pytest
import torch
from torch import nn

from lorakernels import patch_peft, peft_patch_stats, unpatch_peft
from tests.test_model import tiny_llama
from tests.utils import DEVICE, assert_same, run

peft = pytest.importorskip("peft")
from peft.tuners import lora as peft_lora  # noqa: E402

BACKENDS = ["torch", "triton"]  # triton: the kernels, through the interpreter on CPU


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(20, 24, bias=bias, dtype=dtype)
        self.lin1 = nn.Linear(24, 12, bias=bias, dtype=dtype)
        self.emb = nn.Embedding(10, 20, dtype=dtype)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def lora_mlp(dtype=torch.float32, targets=("lin0", "lin1"), **config):
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "target_modules": list(targets), "init_lora_weights": False, **config}
    return peft.get_peft_model(MLP(dtype), peft.LoraConfig(**config))


def patched_vs_peft(model, x, backend, runner=None):
    """(PEFT's results, the patched model's results) of `runner(model)` (default: `run(model, x)`);
    every patched layer's call was fused (a silent fallback to PEFT's forward would match PEFT
    trivially)."""
    runner = runner or (lambda m: run(m, x))
    expected = runner(model)
    report = patch_peft(model, backend=backend)
    try:
        actual = runner(model)
        stats = peft_patch_stats(model)
        assert stats["fallback"] == {} and stats["fused"] == len(report.patched) > 0, stats
        return expected, actual
    finally:
        unpatch_peft(model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "lora_alpha": 6}, {"r": 3}],
                         ids=["plain", "rslora", "rank3"])
@pytest.mark.parametrize("leading", [(7,), (2, 5)], ids=["2d", "3d"])
def test_fp32_outputs_and_gradients_match_peft(backend, config, leading):
    model = lora_mlp(**config)
    expected, actual = patched_vs_peft(model, torch.randn(*leading, 20), backend)
    assert_same(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_base_fp32_adapters_match_peft_to_bf16_rounding(backend):
    # PEFT: bf16 base GEMM, fp32 LoRA term, the sum rounded to bf16 (twice); fused: once.
    model = lora_mlp(torch.bfloat16, targets=("lin0",))
    assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    expected, actual = patched_vs_peft(model, torch.randn(6, 20, dtype=torch.bfloat16), backend)
    assert_same(actual, expected, tol=1e-2)
    stats_model = lora_mlp(torch.bfloat16, targets=("lin0",))
    patch_peft(stats_model, backend=backend)
    stats_model(torch.randn(6, 20, dtype=torch.bfloat16))
    assert peft_patch_stats(stats_model)["fused"] == 1


def test_patch_reports_and_counts_calls():
    model = lora_mlp(targets=("lin0", "lin1", "emb"))
    report = patch_peft(model)
    assert report.patched == ["base_model.model.lin0", "base_model.model.lin1"]
    assert report.not_patched == {"base_model.model.emb": "lora.Embedding: no fused route for this layer type"}
    assert str(report) == ("lorakernels.patch_peft: 2 of 3 LoRA layers patched (2 fused now); "
                           "not patched: 1 x lora.Embedding: no fused route for this layer type")
    model(torch.randn(3, 20))
    with model.disable_adapter():
        model(torch.randn(3, 20))
    stats = peft_patch_stats(model, reset=True)
    assert stats == {"fused": 2, "fallback": {"adapters disabled": 2},
                     "layers": {"base_model.model.lin0": {"fused": 1, "adapters disabled": 1},
                                "base_model.model.lin1": {"fused": 1, "adapters disabled": 1}}}
    assert peft_patch_stats(model)["fused"] == 0


def test_report_flags_an_instance_level_forward():
    # accelerate's add_hook_to_module stores the forward bound before patching on the instance:
    # the patched class's forward is then never called, and the report must say so.
    model = lora_mlp()
    layer = model.base_model.model.lin0
    layer.forward = layer.forward
    report = patch_peft(model)
    assert report.fallback_now == {
        "base_model.model.lin0": "an instance-level forward (accelerate hooks?) bypasses the patched one"}


def test_patch_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        patch_peft("model")
    with pytest.raises(ValueError, match="holds no PEFT LoRA layer"):
        patch_peft(MLP())
    with pytest.raises(ValueError, match="backend must be"):
        patch_peft(lora_mlp(), backend="cuda")
    with pytest.raises(ValueError, match="base GEMM"):
        patch_peft(lora_mlp(), base_gemm="cutlass")


class QuantLinear(nn.Linear):
    """Stands for a quantized base layer (bitsandbytes' Linear4bit subclasses nn.Linear too)."""


def _add_second_adapter(model):
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))


def _only_lin1_adapter(model):
    model.add_adapter("lin1_only", peft.LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False))
    model.set_adapter("lin1_only")


def _adapters_to(model, dtype):
    layer = model.base_model.model.lin0
    layer.lora_A.to(dtype)
    layer.lora_B.to(dtype)


FALLBACKS = {
    "dora": ({"use_dora": True}, None, "LoRA variant (DoRA, aLoRA, ...)"),
    "lora_bias": ({"lora_bias": True}, None, "LoRA bias (lora_bias=True)"),
    "several_adapters": ({}, lambda m: (_add_second_adapter(m), m.base_model.set_adapter(["default", "other"])),
                         "several active adapters"),
    "no_active_adapter_here": ({}, _only_lin1_adapter, "no active adapter on this layer"),
    "merged": ({}, lambda m: m.merge_adapter(), "adapter merged"),
    "fan_in_fan_out": ({}, lambda m: setattr(m.base_model.model.lin0, "fan_in_fan_out", True), "fan_in_fan_out"),
    "hooks": ({}, lambda m: m.base_model.model.lin0.base_layer.register_forward_hook(lambda *a: None),
              "hooks on the base layer or the adapter modules"),
    "trainable_base": ({}, lambda m: m.base_model.model.lin0.base_layer.weight.requires_grad_(True),
                       "base weight requires grad"),
    "bf16_adapters_fp32_base": ({}, lambda m: _adapters_to(m, torch.bfloat16),
                                "dtypes: x torch.float32, base torch.float32, adapters torch.bfloat16"),
    "quantized_base": ({}, lambda m: setattr(m.base_model.model.lin0.base_layer, "__class__", QuantLinear),
                       "base layer is QuantLinear, not nn.Linear or bitsandbytes Linear4bit"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_cases_the_kernels_do_not_compute_run_peft_forward(case):
    config, prepare, reason = FALLBACKS[case]
    model = lora_mlp(**config)
    if prepare is not None:
        prepare(model)
    x = torch.randn(4, 20)
    expected = run(model, x)
    patch_peft(model, backend="torch")
    actual = run(model, x)
    for key in expected:  # PEFT's own forward ran: the same bits (None: no gradient, as when merged)
        assert (actual[key] is None and expected[key] is None) or torch.equal(actual[key], expected[key]), key
    assert peft_patch_stats(model)["layers"]["base_model.model.lin0"] == {reason: 1}


def run_mixed(model, x, adapter_names, grad=True):
    """`run` for PEFT's mixed-batch inference: model(x, adapter_names=...), with gradients or under no_grad."""
    if not grad:
        with torch.no_grad():
            return {"y": model(x, adapter_names=adapter_names)}
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x, adapter_names=adapter_names)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"y": y.detach(), "dx": x.grad, **grads}


def mixed_patched_vs_peft(model, x, adapter_names, backend, grad=True):
    """(PEFT's results, the patched model's results) of one mixed batch; every patched layer's call
    was fused (`patched_vs_peft`)."""
    return patched_vs_peft(model, x, backend, lambda m: run_mixed(m, x, adapter_names, grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("leading", [(5,), (5, 3)], ids=["2d", "3d"])
def test_mixed_batch_adapter_names_is_fused_with_peft_results(backend, grad, leading):
    """PEFT's mixed-batch inference (eval; with or without autograd, as PEFT allows): each row through
    its adapter, "__base__" rows through the base; rows of adapters of different ranks in one call.
    Would catch rows reaching another adapter, a wrong scaling per adapter, a base row with a LoRA
    term, or a gradient reaching an adapter from another adapter's rows."""
    model = lora_mlp()
    _add_second_adapter(model)
    model.base_model.model.lin0.lora_A["other"].weight.requires_grad_(True)  # a second adapter with gradients
    model.eval()
    names = ["other", "default", "__base__", "default", "other"]
    expected, actual = mixed_patched_vs_peft(model, torch.randn(*leading, 20), names, backend, grad)
    assert_same(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_over_adapters_on_different_layers_matches_peft(backend):
    """Adapter "a" on q/v, "b" on q/v/o of a tiny Llama: o_proj takes "a" rows, and a batch of "a"
    alone (no row with an adapter of o_proj), through its base, as PEFT does, fused."""
    config = dict(init_lora_weights=False, lora_alpha=8)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config),
                                adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"], **config))
    model.eval()
    ids = torch.randint(0, 97, (3, 5))
    for names in (["b", "a", "__base__"], ["a", "a", "a"]):
        with torch.no_grad():
            expected = model(ids, adapter_names=names).logits
            patch_peft(model, backend=backend)
            actual = model(ids, adapter_names=names).logits
            stats = peft_patch_stats(model)
            unpatch_peft(model)
        assert stats["fallback"] == {} and stats["fused"] == 6, stats
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=str(names))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", [True, False], ids=["casting", "casting_disabled"])
def test_mixed_batch_bf16_base_fp32_adapters_matches_peft_to_bf16_rounding(backend, casting):
    # PEFT casts each sub-batch to the adapters' fp32 (lora.Linear's mixed batch does so even under
    # disable_input_dtype_casting) and rounds the LoRA term, then the sum, to bf16.
    from peft.helpers import disable_input_dtype_casting

    model = lora_mlp(torch.bfloat16)
    _add_second_adapter(model)
    model.eval()
    x = torch.randn(4, 2, 20, dtype=torch.bfloat16)
    with disable_input_dtype_casting(model, active=not casting):
        expected, actual = mixed_patched_vs_peft(model, x, ["other", "__base__", "default", "other"], backend,
                                                 grad=False)
    assert_same(actual, expected, tol=1e-2)


def _mixed_dora(model):
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin0", "lin1"], use_dora=True))


def _mixed_bf16_other(model):
    _add_second_adapter(model)  # fp32 under the bf16 base, as "default" (PEFT's autocast_adapter_dtype)
    for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
        layer.lora_A["other"].to(torch.bfloat16)
        layer.lora_B["other"].to(torch.bfloat16)


MIXED_FALLBACKS = {  # (model dtype, prepare, adapter_names, lin0's reason); PEFT raises in the first three
    "dora_named": (torch.float32, _mixed_dora, ["other", "default"], "LoRA variant (DoRA, aLoRA, ...)"),
    "merged": (torch.float32, lambda m: (_add_second_adapter(m), m.merge_adapter()), ["other", "default"],
               "adapter merged"),
    "length": (torch.float32, _add_second_adapter, ["other", "default", "default"],
               "adapter_names is not one name per entry of x's first dimension"),
    "dtypes_differ": (torch.bfloat16, _mixed_bf16_other, ["other", "default"],
                      "adapters of different dtypes in one batch"),
    "ranks_above_256": (torch.float32, lambda m: m.add_adapter("other", peft.LoraConfig(
        r=253, target_modules=["lin0", "lin1"], init_lora_weights=False)), ["other", "default"],
        "ranks of the adapters in one batch sum above 256"),
}


@pytest.mark.parametrize("case", list(MIXED_FALLBACKS))
def test_mixed_batch_cases_the_kernels_do_not_compute_run_peft_forward(case):
    dtype, prepare, names, reason = MIXED_FALLBACKS[case]
    model = lora_mlp(dtype)
    prepare(model)
    model.eval()
    x = torch.randn(2, 20, dtype=dtype)

    def outcome():
        try:
            with torch.no_grad():
                return model(x, adapter_names=names)
        except ValueError as error:  # PEFT's own refusal
            return str(error)

    expected = outcome()
    patch_peft(model, backend="torch")
    actual = outcome()
    assert type(actual) is type(expected) and (torch.equal(actual, expected) if torch.is_tensor(actual)
                                               else actual == expected)
    assert peft_patch_stats(model)["layers"]["base_model.model.lin0"] == {reason: 1}


@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["lora.bnb.Linear4bit", "lora.Linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_over_a_four_bit_base_is_fused_with_peft_results(backend, loaded_in_4bit):
    pytest.importorskip("bitsandbytes")
    from tests.test_qlora import _peft_4bit_mlp

    model = _peft_4bit_mlp(peft, loaded_in_4bit, torch.float32)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    model.eval()
    # bitsandbytes would repack the weight into its CPU layout (AVX512-BF16 CPUs, eval, no gradients),
    # which the kernels do not read, and compute otherwise: keep its 4-bit format.
    model.base_model.model[0].base_layer.support_avx512bf16_for_cpu = False
    # No autograd: PEFT's own mixed batch over a 4-bit base fails there (an in-place add to
    # bitsandbytes' MatMul4Bit output).
    expected, actual = mixed_patched_vs_peft(model, torch.randn(3, 4, 128), ["other", "__base__", "default"],
                                             backend, grad=False)
    assert_same(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_adapter_and_disable_adapter_are_followed_per_call(backend):
    model = lora_mlp()
    _add_second_adapter(model)
    x = torch.randn(5, 20)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = run(model, x)
    with model.disable_adapter():
        expected["disabled"] = model(x).detach()
    patch_peft(model, backend=backend)
    for name in ("other", "default"):
        model.set_adapter(name)
        assert_same(run(model, x), expected[name])
    with model.disable_adapter():
        assert torch.equal(model(x), expected["disabled"])
    assert peft_patch_stats(model)["fused"] == 4  # two layers, two adapters; the disabled call fell back


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_uses_the_layers_p_and_eval_turns_it_off(backend):
    # y = dropout(x) exactly: zero base weight, lora_A = lora_B = I, scaling 1.
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(64, 64, bias=False)),
                                peft.LoraConfig(r=64, lora_alpha=64, lora_dropout=0.25, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(64))
        layer.lora_B["default"].weight.copy_(torch.eye(64))
    patch_peft(model, backend=backend)
    x = torch.ones(128, 64, requires_grad=True)
    y = model(x)
    y.sum().backward()
    kept = y != 0
    assert abs((~kept).float().mean().item() - 0.25) < 0.025  # 5 standard deviations at 8192 draws
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(x.grad, y.detach())  # backward regenerates the forward's mask
    model.eval()
    assert torch.equal(model(x), x)
    assert peft_patch_stats(model)["fused"] == 2


def test_inference_mode_is_fused():
    model = lora_mlp()
    x = torch.randn(3, 20)
    with torch.no_grad():
        expected = model(x)
    patch_peft(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert peft_patch_stats(model)["fused"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_matches_peft(backend):
    model = lora_mlp()
    x = torch.randn(6, 20)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        expected, actual = patched_vs_peft(model, x, backend)
    assert actual["y"].dtype == torch.bfloat16
    # PEFT's LoRA term runs in bf16 under autocast, the fused one in fp32 (fp32 adapters):
    # they differ by bf16 rounding of the output and of the adapter gradients.
    assert_same(actual, expected, tol=3e-2)
    patch_peft(model, backend=backend)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        model(x)
    assert peft_patch_stats(model)["fused"] == 2


def _graph_recorder(graphs):
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_of_a_patched_layer(backend):
    model = lora_mlp(lora_dropout=0.1).eval()  # eval: dropout off, comparable with PEFT
    layer = model.base_model.model.lin0
    x = torch.randn(2, 3, 20)
    expected = run(layer, x)
    patch_peft(model, backend=backend)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=_graph_recorder(graphs))
    assert_same(run(compiled, x), expected)
    assert any("lorakernels.lora_linear_forward" in g for g in graphs)  # the fused op, not PEFT's ops
    assert any("lorakernels.lora_linear_backward" in g for g in graphs)
    with model.disable_adapter():  # per-call check inside the compiled code: PEFT's path
        torch.testing.assert_close(compiled(x), layer.base_layer(x))
    torch._dynamo.reset()


def _llama(checkpointing, reentrant=False, dropout=0.0):
    model = tiny_llama(seed=0).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                             init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    if checkpointing and reentrant:
        model.enable_input_require_grads()
    return model


def _llama_step(model, seed=1):
    model.zero_grad()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator(DEVICE).manual_seed(5), device=DEVICE)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_transformers_gradient_checkpointing(reentrant):
    # dropout 0: patched equals PEFT under transformers' checkpointing.
    model = _llama(True, reentrant)
    expected = _llama_step(model)
    patch_peft(model, backend="torch")
    assert_same(_llama_step(model), expected)
    # dropout > 0: the recompute redraws the forward's seed, so checkpointing changes no gradient.
    plain, checkpointed = _llama(False, dropout=0.2), _llama(True, reentrant, dropout=0.2)
    for m in (plain, checkpointed):
        patch_peft(m, backend="torch")
    a, b = _llama_step(plain), _llama_step(checkpointed)
    assert_same(b, a)
    for m in (model, plain, checkpointed):  # fused, not PEFT's forward (which would match trivially)
        stats = peft_patch_stats(m)
        assert stats["fallback"] == {} and stats["fused"] > 0, stats
    assert not torch.equal(a["loss"], expected["loss"])  # dropout was applied


def test_patched_model_saves_loads_merges_like_peft(tmp_path):
    model = lora_mlp()
    params = list(model.parameters())
    state = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    report = patch_peft(model)
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params))
    assert isinstance(model.base_model.model.lin0, peft_lora.Linear)
    assert repr(model.base_model.model.lin0).startswith("lora.Linear(")
    saved = peft.get_peft_model_state_dict(model)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the base weights lora_mlp's MLP got
    loaded = peft.PeftModel.from_pretrained(MLP(), tmp_path)
    x = torch.randn(3, 20)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(model)
    assert type(copied.base_model.model.lin0) is type(model.base_model.model.lin0)
    copied(x)
    assert peft_patch_stats(copied)["fused"] == 2 + peft_patch_stats(model)["fused"]
    merged = model.merge_and_unload()
    assert type(merged.lin0) is nn.Linear
    torch.testing.assert_close(merged(x), loaded(x), rtol=1e-5, atol=1e-5)
    assert len(report.patched) == 2


def test_unpatch_restores_peft_classes():
    model = lora_mlp()
    patch_peft(model)
    patch_peft(model)  # idempotent
    assert unpatch_peft(model) == 2
    layer = model.base_model.model.lin0
    assert type(layer) is peft_lora.Linear
    assert not any(k.startswith("_lorakernels") for k in vars(layer))
    assert unpatch_peft(model) == 0
    assert peft_patch_stats(model) == {"fused": 0, "fallback": {}, "layers": {}}


def _lin0(model):
    return model.base_model.model.lin0


def _set_dropout(model, module):
    _lin0(model).lora_dropout["default"] = module


def _global_hook(model):
    return nn.modules.module.register_module_forward_hook(lambda *args: None)


# Changes to a patched layer after a fused call has cached its route: (set up before that call,
# the change, what the next call of lin0 does). Fallback changes cover what the route judges
# (flags, PEFT's dicts mutated in place, modules, parameters, hooks); fused ones what it reads
# (the new scaling, module or weight must be the one computed with).
ROUTE_CHANGES = {
    **{case: (None, prepare, reason) for case, (config, prepare, reason) in FALLBACKS.items() if not config},
    "disabled": (None, lambda m: m.base_model.disable_adapter_layers(), "adapters disabled"),
    "hook_on_lora_B": (None, lambda m: _lin0(m).lora_B["default"].register_forward_pre_hook(lambda *a: None),
                       "hooks on the base layer or the adapter modules"),
    "global_hook": (None, _global_hook, "hooks on the base layer or the adapter modules"),
    "dropout_p_1": (lambda m: _set_dropout(m, nn.Dropout(0.0)), lambda m: setattr(_lin0(m).lora_dropout["default"],
                    "p", 1.0), "dropout is not nn.Dropout(p < 1) or nn.Identity"),
    "strided_lora_B": (None, lambda m: setattr(_lin0(m).lora_B["default"], "weight", nn.Parameter(
        torch.randn(4, 24).t())), "a weight without a unit last-dim stride"),
    "scaling_in_place": (None, lambda m: _lin0(m).scaling.__setitem__("default", 0.75), "fused"),
    "set_scale": (None, lambda m: _lin0(m).set_scale("default", 3.0), "fused"),
    "other_adapter": (_add_second_adapter, lambda m: m.set_adapter("other"), "fused"),
    "lora_A_swapped": (None, lambda m: _lin0(m).lora_A.__setitem__("default", nn.Linear(20, 4, bias=False)), "fused"),
    "base_weight_swapped": (None, lambda m: setattr(_lin0(m).base_layer, "weight", nn.Parameter(
        torch.randn(24, 20), requires_grad=False)), "fused"),
    "rank_changed_in_place": (None, lambda m: (setattr(_lin0(m).lora_A["default"].weight, "data", torch.randn(6, 20)),
                                               setattr(_lin0(m).lora_B["default"].weight, "data", torch.randn(24, 6))),
                              "fused"),
    "dropout_swapped": (None, lambda m: _set_dropout(m, nn.Dropout(0.0)), "fused"),
}


@pytest.mark.parametrize("case", list(ROUTE_CHANGES))
def test_a_cached_route_follows_every_change_of_the_layer(case):
    """The route of a patched layer is cached after its first call and judged again when anything
    it depends on changes. Would catch a stale route: a fused call after a change that PEFT
    computes otherwise (merged, hooked, unfrozen base, ...), or one computing with the old
    scaling, module or weight. An unpatched twin takes the same changes (same seeds)."""
    setup, change, outcome = ROUTE_CHANGES[case]
    x = torch.randn(4, 20)
    peft_model, model = lora_mlp(), lora_mlp()
    patch_peft(model, backend="torch")
    for m in (peft_model, model):
        if setup is not None:
            torch.manual_seed(1)
            setup(m)
    run(model, x)
    assert peft_patch_stats(model, reset=True)["layers"]["base_model.model.lin0"] == {"fused": 1}
    handles = []
    try:
        for m in (peft_model, model):
            torch.manual_seed(2)
            handles.append(change(m))
        expected, actual = run(peft_model, x), run(model, x)
    finally:
        for handle in handles:
            if hasattr(handle, "remove"):
                handle.remove()
    assert peft_patch_stats(model)["layers"]["base_model.model.lin0"] == {outcome: 1}
    if outcome == "fused":
        assert_same(actual, expected)
    else:  # PEFT's own forward ran: the same bits (None: no gradient, as when merged)
        for key in expected:
            assert (actual[key] is None and expected[key] is None) or torch.equal(actual[key], expected[key]), key
