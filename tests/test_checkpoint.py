import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import AdapterLoadError, LoraConfig, LoraModel, get_peft_model

from tiny import ids, randomize_lora, tiny_llama


def _saved(tmp_path, **cfg):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, **cfg))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path)
    return pm


def _untouched(model):
    return [n for n, _ in model.named_modules()]


def test_save_writes_peft_layout(tmp_path):
    pm = _saved(tmp_path, modules_to_save=["lm_head"])
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"]))
    pm.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.weight" in keys
    assert not any("default" in k for k in keys)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"]  # family default recorded as names
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_round_trip_identical(tmp_path):
    pm = _saved(tmp_path, target_modules="all-linear")
    x = ids()
    out = pm(x).logits
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(x).logits, out, atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default
    trainable = LoraModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_truncated_file_is_refused(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    model = tiny_llama()
    before = _untouched(model)
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        LoraModel.from_pretrained(model, tmp_path)
    assert _untouched(model) == before


def test_wrong_shape_names_module_and_shapes(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key] = torch.zeros(99, 4)
    save_file(sd, path)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(AdapterLoadError) as e:
        pm.load_adapter(tmp_path, "x")
    assert key in str(e.value) and "(99, 4)" in str(e.value) and "(16, 4)" in str(e.value)
    assert list(pm.peft_config) == ["default"]
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in before.items())


def test_missing_key_and_extra_key(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    sd.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    sd["base_model.model.model.layers.0.self_attn.zz.lora_A.weight"] = torch.zeros(4, 32)
    save_file(sd, path)
    with pytest.raises(AdapterLoadError) as e:
        LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert "missing keys" in str(e.value) and "no place for" in str(e.value)


def test_adapter_for_another_base_model(tmp_path):
    _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = _untouched(other)
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        LoraModel.from_pretrained(other, tmp_path)
    assert _untouched(other) == before


def test_target_missing_in_model(tmp_path):
    _saved(tmp_path, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query_key_value"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="does not fit this model"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_saved_targets_the_model_partly_lacks_load_when_the_weights_match(tmp_path):
    # peft records names a model may lack (blip-2's default lists q, v, q_proj, v_proj for its sub-models;
    # its own wrapper paths): loading goes by the file's keys, which must still match one by one
    pm = _saved(tmp_path, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "query_key_value", "classifier.original_module"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    x = ids()
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pm(x).logits, atol=0, rtol=0)
    other = get_peft_model(tiny_llama(), LoraConfig(r=4))
    other.load_adapter(tmp_path, adapter_name="second")
    assert "second" in other.peft_config
    with pytest.raises(Exception, match="match no module"):  # building a config by hand stays strict
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "query_key_value"]))


def test_nan_weights_refused(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    next(iter(sd.values()))[0, 0] = float("nan")
    save_file(sd, path)
    with pytest.raises(AdapterLoadError, match="NaN"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_pickle_only_with_consent(tmp_path):
    pm = _saved(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(sd, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    x = ids()
    torch.testing.assert_close(loaded(x).logits, pm(x).logits)


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "nope")


def test_other_base_model_name_warns(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/model-a"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    model.config._name_or_path = "org/model-b"
    with pytest.warns(UserWarning, match="made for 'org/model-a'"):
        LoraModel.from_pretrained(model, tmp_path)


def test_embedded_model_aliases_and_its_cache_folder_are_the_same_base(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    from lorakit.models.embedded import embedded_cache_path

    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "embedded"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    for loaded_as in (str(embedded_cache_path()), str(embedded_cache_path()) + "/", "SmolLM2-135M-Instruct"):
        model = tiny_llama()
        model.config._name_or_path = loaded_as
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "made for another model" warning
            LoraModel.from_pretrained(model, tmp_path)
    model = tiny_llama()
    model.config._name_or_path = "org/other"
    with pytest.warns(UserWarning, match="made for 'embedded'"):
        LoraModel.from_pretrained(model, tmp_path)


def test_saved_config_records_what_peft_writes(tmp_path):
    from tiny import tiny_gpt2

    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path / "gpt2")
    cfg = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["inference_mode"] is True and cfg["peft_type"] == "LORA"
    assert pm.peft_config["default"].fan_in_fan_out is False  # the live config is not changed
    loaded = LoraModel.from_pretrained(tiny_gpt2(), tmp_path / "gpt2", is_trainable=True)
    assert loaded.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    seq = get_peft_model(bert, LoraConfig(r=2, task_type="SEQ_CLS"))
    seq.save_pretrained(tmp_path / "bert")
    cfg = json.loads((tmp_path / "bert" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    keys = load_file(tmp_path / "bert" / "adapter_model.safetensors").keys()
    assert "base_model.model.classifier.weight" in keys


def test_base_embedding_weights_in_a_peft_file_are_dropped_and_checked(tmp_path):
    # peft's save_embedding_layers adds the base embedding (and a tied head's) weights to the file
    import warnings

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    base = tiny_llama()
    emb = base.get_input_embeddings().weight.detach().clone()
    sd["base_model.model.model.embed_tokens.base_layer.weight"] = emb
    sd["base_model.model.lm_head.weight"] = base.get_output_embeddings().weight.detach().clone()
    save_file(sd, path)
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights as this model's: nothing to say
        loaded = LoraModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pm(x).logits, rtol=0, atol=0)
    sd["base_model.model.model.embed_tokens.base_layer.weight"] = emb + 1.0  # e.g. rows added by a resize
    save_file(sd, path)
    with pytest.warns(UserWarning, match="base embedding weights .* differ"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)
