"""get_layer_status / get_model_status (status.py): peft's fields, and 'irregular' where layers disagree."""
from __future__ import annotations

from lorakit import LoraConfig, get_peft_model

from tiny import tiny_llama


def _model():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    return model


def test_layer_status_lists_every_adapter_layer():
    model = _model()
    layers = model.get_layer_status()
    by_name = {s.name: s for s in layers}
    assert set(by_name) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")} | {"lm_head"}
    v = by_name["model.layers.0.self_attn.v_proj"]
    assert v.module_type == "lora.Linear"  # as peft names it
    assert v.available_adapters == ["default", "other"] and v.active_adapters == ["default"]
    assert v.requires_grad == {"default": True, "other": False} and v.enabled and v.merged_adapters == []
    assert v.devices == {"default": ["cpu"], "other": ["cpu"]} and v.quantization_backend is None
    assert by_name["lm_head"].module_type == "lora.ModulesToSave" and by_name["lm_head"].requires_grad == {"default": True}


def test_model_status_folds_layers_and_flags_disagreement():
    model = _model()
    st = model.get_model_status()
    assert st.base_model_type == "LlamaForCausalLM" and st.adapter_model_type == "LoraModel"
    assert st.peft_types == {"default": "LORA", "other": "LORA"} and st.available_adapters == ["default", "other"]
    assert st.num_adapter_layers == 5 and st.enabled is True and st.active_adapters == ["default"]
    assert st.requires_grad == {"default": True, "other": False}
    assert (st.trainable_params, st.total_params) == model.get_nb_trainable_parameters()
    model.merge_adapter()
    assert model.get_model_status().merged_adapters == ["default"]
    model.unmerge_adapter()
    # one layer switched by hand: the model is in an inconsistent state, and the status says so
    layer = model.get_submodule("model.model.layers.0.self_attn.q_proj")
    layer.disable_adapters = True
    for p in model.get_submodule("model.model.layers.1.self_attn.v_proj").lora_A["other"].parameters():
        p.requires_grad_(True)
    st = model.get_model_status()
    assert st.enabled == "irregular" and st.requires_grad["other"] == "irregular"
