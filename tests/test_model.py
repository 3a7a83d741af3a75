import copy

import pytest
import torch

from lorakit import LoraConfig, LoraError, LoraModel, TargetError, get_peft_model
from lorakit.layers import LoraLayer

from tiny import ids, randomize_lora, tiny_bloom, tiny_gpt2, tiny_llama


def _base_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_seed_example_on_bloom_trains():
    model = tiny_bloom()
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules={"query_key_value"}, lora_alpha=32, lora_dropout=0.1)
    pm = get_peft_model(model, cfg)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 2 * 8 * (32 + 96)  # two layers, A: 8x32, B: 96x8
    pm.train()
    x = ids()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_print_trainable_parameters(capsys):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    pm.print_trainable_parameters()
    out = capsys.readouterr().out
    # per layer: q 4x(32+32) + v 4x(32+16) = 448; two layers
    assert out.startswith("trainable params: 896 || all params:")


def test_conv1d_merge_uses_transposed_update():
    model = tiny_gpt2()
    x = ids()
    pm = get_peft_model(model, LoraConfig(r=4))
    randomize_lora(pm)
    before = pm(x).logits
    layer = pm.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) and layer.fan_in_fan_out
    pm.merge_adapter()
    torch.testing.assert_close(pm(x).logits, before, atol=1e-5, rtol=0)


def test_merge_twice_is_noop_and_unmerge_restores():
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(pm)
    w0 = pm.model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    pm.merge_adapter()
    w1 = pm.model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    pm.merge_adapter()
    assert torch.equal(pm.model.model.layers[0].mlp.up_proj.base_layer.weight, w1)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm.model.model.layers[0].mlp.up_proj.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_safe_merge_refuses_nan_and_changes_nothing():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    randomize_lora(pm)
    with torch.no_grad():
        pm.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = _base_weights(pm.model)
    with pytest.raises(LoraError, match="NaN/inf"):
        pm.merge_adapter(safe_merge=True)
    after = pm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    assert not any(l.merged for _, l in pm.lora_layers())


def test_unload_returns_plain_modules():
    model = tiny_llama()
    x = ids()
    ref = model(x).logits
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(pm)
    plain = pm.unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, ref)
    with pytest.raises(LoraError, match="unloaded"):
        pm(x)


def test_inference_mode_has_no_trainable_params():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, inference_mode=True))
    assert pm.get_nb_trainable_parameters()[0] == 0


def test_several_adapters_set_disable_delete():
    model = tiny_llama()
    x = ids()
    ref = model(x).logits
    pm = get_peft_model(model, LoraConfig(r=4))
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_lora(pm)
    out_default = pm(x).logits
    pm.set_adapter("other")
    out_other = pm(x).logits
    assert not torch.allclose(out_default, out_other)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(x).logits, ref)
    torch.testing.assert_close(pm(x).logits, out_other)
    pm.delete_adapter("other")
    assert pm.active_adapter == "default"
    torch.testing.assert_close(pm(x).logits, out_default)
    with pytest.raises(LoraError, match="no adapter named 'other'"):
        pm.set_adapter("other")
    with pytest.raises(LoraError, match="exists already"):
        pm.add_adapter("default", LoraConfig())
    with pytest.raises(LoraError, match="not allowed"):
        pm.add_adapter("a.b", LoraConfig())


def test_add_adapter_with_bad_target_changes_nothing():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    structure = [n for n, _ in pm.named_modules()]
    with pytest.raises(TargetError):
        pm.add_adapter("bad", LoraConfig(target_modules=["q_proj", "nope"]))
    assert [n for n, _ in pm.named_modules()] == structure and list(pm.peft_config) == ["default"]


def test_per_row_adapters_in_one_batch():
    model = tiny_llama()
    x = ids(batch=3)
    pm = get_peft_model(model, LoraConfig(r=4))
    pm.add_adapter("b", LoraConfig(r=4))
    randomize_lora(pm)
    with torch.no_grad():
        a_out = pm(x).logits
        pm.set_adapter("b")
        b_out = pm(x).logits
        with pm.disable_adapter():
            base = pm(x).logits
        mixed = pm(x, adapter_names=["default", "b", "__base__"]).logits
    torch.testing.assert_close(mixed[0], a_out[0])
    torch.testing.assert_close(mixed[1], b_out[1])
    torch.testing.assert_close(mixed[2], base[2])
    with pytest.raises(LoraError, match="unknown adapters"):
        pm(x, adapter_names=["zzz", "b", "b"])


def test_modules_to_save_trains_a_copy():
    model = tiny_llama()
    head = model.lm_head.weight.clone()
    pm = get_peft_model(model, LoraConfig(r=4, modules_to_save=["lm_head"]))
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert "model.lm_head.modules_to_save.default.weight" in names
    assert "model.lm_head.original_module.weight" not in names
    sd = pm.lora_state_dict()
    assert torch.equal(sd["base_model.model.lm_head.weight"], head)


def test_bias_all_trains_biases():
    pm = get_peft_model(tiny_bloom(), LoraConfig(r=4, bias="all"))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any(n.endswith("dense_4h_to_h.bias") for n in trainable)
    keys = pm.lora_state_dict().keys()
    assert any(k.endswith("query_key_value.base_layer.bias") for k in keys)


def test_embedding_targets_and_merge():
    model = tiny_llama()
    x = ids()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_lora(pm)
    out = pm(x).logits
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(x).logits, out, atol=1e-5, rtol=0)


def test_peft_style_attribute_access():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    assert pm.config.model_type == "llama"
    assert pm.base_model.model is pm.model
    with pytest.raises(LoraError, match="already has LoRA"):
        LoraModel(pm, LoraConfig())


def test_gaussian_and_false_init():
    torch.manual_seed(0)
    model = tiny_llama()
    x = ids()
    ref = model(x).logits
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, init_lora_weights="gaussian"))
    torch.testing.assert_close(pm(x).logits, ref)
    pm2 = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, init_lora_weights=False))
    assert not torch.allclose(pm2(x).logits, ref)


def test_lora_model_deepcopies():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, rank_pattern={"v_proj": 2}))
    randomize_lora(pm)
    twin = copy.deepcopy(pm)
    x = ids()
    torch.testing.assert_close(twin(x).logits, pm(x).logits)


def test_per_row_routing_with_repeated_rows_and_unequal_ranks():
    model = tiny_llama()
    x = ids(batch=4)
    pm = get_peft_model(model, LoraConfig(r=4))
    pm.add_adapter("b", LoraConfig(r=2))  # another rank: the per-adapter loop path
    randomize_lora(pm)
    with torch.no_grad():
        a_out = pm(x).logits
        pm.set_adapter("b")
        b_out = pm(x).logits
        mixed = pm(x, adapter_names=["b", "default"]).logits  # 2 names for 4 rows: each repeated
        batched = pm(x, adapter_names=["default", "__base__", "default", "default"]).logits
        with pm.disable_adapter():
            base = pm(x).logits
    torch.testing.assert_close(mixed[:2], b_out[:2])
    torch.testing.assert_close(mixed[2:], a_out[2:])
    torch.testing.assert_close(batched[[0, 2, 3]], a_out[[0, 2, 3]])
    torch.testing.assert_close(batched[1], base[1])


def test_peft_named_helpers_work_as_in_peft(tmp_path):
    import lorakit

    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(pm)
    x = ids()
    assert pm.get_base_model() is model and pm.peft_type == "LORA" == pm.peft_config["default"].peft_type
    with torch.no_grad():
        adapted = pm(x).logits
        pm.disable_adapter_layers()
        plain = pm(x).logits
        pm.enable_adapter_layers()
        again = pm(x).logits
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(pm(x).logits, plain)
    assert not torch.allclose(adapted, plain)
    torch.testing.assert_close(again, adapted)

    sd = lorakit.get_peft_model_state_dict(pm)
    assert sd.keys() == pm.lora_state_dict().keys()
    other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.set_peft_model_state_dict(other, sd)
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, adapted)
    with pytest.raises(LoraError, match="state_dict"):
        lorakit.get_peft_model_state_dict(pm, state_dict={})
    with pytest.raises(LoraError, match="LoraModel"):
        lorakit.get_peft_model_state_dict(model)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(Exception, match="missing"):
        lorakit.set_peft_model_state_dict(other, bad)

    pm.peft_config["default"].save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == pm.peft_config["default"]


def test_linear_subclass_output_modified_in_place_downstream_trains():
    # Falcon's FalconLinear + ``mlp_output += attention_output``: the wrapped layer's output must not be a
    # view made inside lorakit's autograd function, or the in-place add fails in training
    class MyLinear(torch.nn.Linear):
        pass

    class Net(torch.nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.proj, self.inplace = MyLinear(8, 6), inplace

        def forward(self, x):
            y = self.proj(x)
            if self.inplace:
                y += x[..., :6]
            else:
                y = y + x[..., :6]
            return y.square().sum()

    x = torch.randn(2, 3, 8)
    grads = []
    for inplace in (True, False):
        torch.manual_seed(0)
        m = get_peft_model(Net(inplace), LoraConfig(r=2, target_modules=["proj"], lora_dropout=0.0))
        randomize_lora(m)
        m.train()
        m(x).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_a_second_adapter_is_refused_when_any_trains_the_shared_biases(tmp_path):
    pm = get_peft_model(tiny_bloom(), LoraConfig(r=4, bias="all"))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(LoraError, match="bias='none' for every adapter"):
        pm.add_adapter("other", LoraConfig(r=4))
    assert set(pm.peft_config) == {"default"}
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items()) and pm.state_dict().keys() == before.keys()
    plain = get_peft_model(tiny_bloom(), LoraConfig(r=4))
    with pytest.raises(LoraError, match="bias='lora_only'"):
        plain.add_adapter("other", LoraConfig(r=4, bias="lora_only"))
    pm.save_pretrained(tmp_path)
    with pytest.raises(LoraError, match="shares|shared|every adapter"):
        plain.load_adapter(tmp_path, adapter_name="biased")


def test_loading_for_inference_switches_dropout_off(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5))
    pm.save_pretrained(tmp_path)
    base = tiny_llama().train()
    loaded = LoraModel.from_pretrained(base, tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    trainable = LoraModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert trainable.model.training
    other = get_peft_model(tiny_llama().train(), LoraConfig(r=4))
    other.train()
    other.load_adapter(tmp_path, adapter_name="second")
    assert not other.training


def test_per_row_adapters_route_modules_to_save_copies_too():
    # each row's head is its own adapter's trained copy; "__base__" rows and adapters without a copy use the
    # original (peft's rule); the LoRA layers and the head must agree row by row
    x = ids(batch=4)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, modules_to_save=["lm_head"]))
    pm.add_adapter("b", LoraConfig(r=4))  # no head copy
    randomize_lora(pm)
    with torch.no_grad():
        pm.model.lm_head.modules_to_save["default"].weight.add_(torch.randn_like(pm.model.lm_head.weight))
        a_out = pm(x).logits
        pm.set_adapter("b")
        b_out = pm(x).logits
        with pm.disable_adapter():
            base = pm(x).logits
        pm.set_adapter("default")
        mixed = pm(x, adapter_names=["default", "__base__", "b", "default"]).logits
    assert not torch.allclose(a_out[1], base[1], atol=1e-3)
    torch.testing.assert_close(mixed[0], a_out[0])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed[2], b_out[2])
    torch.testing.assert_close(mixed[3], a_out[3])


def test_copies_and_pickles_after_a_training_forward_with_dropout(tmp_path):
    import io
    import pickle

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1))
    randomize_lora(pm)
    pm.train()
    x = ids()
    pm(input_ids=x, labels=x).loss.backward()  # the shared dropout caches this pass's masked input
    twin = copy.deepcopy(pm)
    restored = pickle.loads(pickle.dumps(pm))
    buf = io.BytesIO()
    torch.save(pm, buf)
    for m in (pm, twin, restored):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, pm(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(restored(x).logits, pm(x).logits, rtol=0, atol=0)


def test_nested_disable_adapter_blocks():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    randomize_lora(pm)
    x = ids()
    with torch.no_grad():
        adapted = pm(x).logits
        with pm.disable_adapter():
            base = pm(x).logits
            with pm.disable_adapter():
                pass
            torch.testing.assert_close(pm(x).logits, base)  # still off after the inner block
        torch.testing.assert_close(pm(x).logits, adapted)


def test_per_row_routing_sees_weight_changes_and_trains_over_micro_batches():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    pm.add_adapter("b", LoraConfig(r=4))
    randomize_lora(pm)
    x = ids(batch=2)
    rows = ["default", "b"]
    with torch.no_grad():
        before = pm(x, adapter_names=rows).logits
        for n, p in pm.named_parameters():
            if ".b." in n and "lora_B" in n:
                p.data.mul_(0)  # a change that does not bump the parameter's version
        after = pm(x, adapter_names=rows).logits
        pm.set_adapter("b")
        torch.testing.assert_close(after[1], pm(x).logits[1])  # adapter b is now a no-op: the base
        pm.set_adapter("default")
    assert not torch.allclose(before[1], after[1])
    pm.train()
    for _ in range(2):  # gradient accumulation: the same rows twice, two backward passes
        pm(x, adapter_names=rows).logits.square().mean().backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def test_set_adapter_and_loading_take_peft_arguments(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    pm.save_pretrained(tmp_path / "sub")
    other = get_peft_model(tiny_llama(), LoraConfig(r=4))
    other.load_adapter(tmp_path, adapter_name="x", subfolder="sub", low_cpu_mem_usage=True, torch_device="cpu")
    other.set_adapter("x")  # peft: the activated adapter trains unless inference_mode=True
    assert other.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0] > 0
    other.set_adapter("x", inference_mode=True)
    assert other.get_nb_trainable_parameters()[0] == 0
    with pytest.raises(LoraError, match="autocast_adapter_dtype=False"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "sub", autocast_adapter_dtype=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "sub", bogus=1)
    with pytest.raises(AttributeError, match="'LoraModel' object has no attribute 'nope' .*LlamaForCausalLM"):
        pm.nope
    assert not hasattr(pm, "nope")


def test_set_requires_grad_switches_named_adapters_only():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))

    def trains(name):
        return {p.requires_grad for p in model.adapter_parameters(name)}

    assert trains("default") == {True} and trains("other") == {False}
    model.set_requires_grad("other")
    assert trains("default") == {True} and trains("other") == {True}  # both train now
    model.set_requires_grad(["default"], requires_grad=False)
    assert trains("default") == {False} and trains("other") == {True}
    with pytest.raises(LoraError, match="no adapter named 'nope'"):
        model.set_requires_grad(["other", "nope"], False)
    assert trains("other") == {True}  # refused before anything changed
    model.set_adapter("default")
    assert trains("default") == {True} and trains("other") == {False}
