import json

import pytest

from lorakit import ConfigError, LoraConfig, TaskType


def test_seed_example_fields():
    cfg = LoraConfig(base_model_name_or_path="Langboat/bloom-1b4-zh", task_type=TaskType.CAUSAL_LM,
                     inference_mode=False, r=8, target_modules={"query_key_value"}, lora_alpha=32,
                     lora_dropout=0.1, modules_to_save=None)
    assert cfg.task_type is TaskType.CAUSAL_LM
    assert cfg.target_modules == ("query_key_value",)
    assert cfg.scaling_for(8, 32) == 4.0


def test_task_type_from_string_and_rslora_scaling():
    cfg = LoraConfig(task_type="seq_cls", use_rslora=True, r=16, lora_alpha=8)
    assert cfg.task_type is TaskType.SEQ_CLS
    assert cfg.scaling_for(16, 8) == pytest.approx(2.0)


@pytest.mark.parametrize("kw, needle", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a positive number"),
    ({"lora_dropout": 1.0}, "lora_dropout must be a number in [0, 1)"),
    ({"lora_dropout": -0.1}, "lora_dropout must be a number in [0, 1)"),
    ({"bias": "some"}, "bias='some' is unknown"),
    ({"task_type": "CAUSAL"}, "task_type='CAUSAL' is unknown"),
    ({"init_lora_weights": "uniform"}, "init_lora_weights='uniform' is unknown"),
    ({"target_modules": "q_proj("}, "not a valid regular expression"),
    ({"target_modules": []}, "empty list"),
    ({"target_modules": ["q", 3]}, "non-empty module names"),
    ({"inference_mode": "yes"}, "inference_mode must be True or False"),
    ({"layers_pattern": "layers"}, "layers_pattern only applies with layers_to_transform"),
    ({"layers_to_transform": [-1]}, "layer indices"),
    ({"target_modules": ".*q_proj", "layers_to_transform": 0}, "cannot be combined with a regex"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
])
def test_bad_values_are_named(kw, needle):
    with pytest.raises(ConfigError) as e:
        LoraConfig(**kw)
    assert needle in str(e.value)


def test_config_is_frozen_and_replace_validates():
    cfg = LoraConfig(r=4)
    with pytest.raises(Exception):
        cfg.r = 8
    assert cfg.replace(r=16).r == 16 and cfg.r == 4
    with pytest.raises(ConfigError):
        cfg.replace(r=-1)
    with pytest.raises(TypeError):
        cfg.rank_pattern["x"] = 1  # mappings are read-only too


def test_json_round_trip_uses_peft_names(tmp_path):
    cfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=16, target_modules=["q", "v"],
                     modules_to_save=["lm_head"], rank_pattern={"q": 2}, layers_to_transform=[0, 1])
    cfg.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "SEQ_2_SEQ_LM"
    assert data["target_modules"] == ["q", "v"] and data["rank_pattern"] == {"q": 2}
    again = LoraConfig.from_pretrained(tmp_path)
    assert again == cfg


def test_unknown_keys_at_neutral_values_load(tmp_path):
    data = LoraConfig(r=4).to_dict()
    data.update({"some_future_option": None, "use_qalora": False, "peft_version": "9.9"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    assert LoraConfig.from_pretrained(tmp_path).r == 4


def test_unsupported_feature_is_refused():
    with pytest.raises(ConfigError, match="lora_bias=True"):
        LoraConfig.from_dict({"r": 4, "lora_bias": True})
    with pytest.raises(ConfigError, match="some_future_option=3"):
        LoraConfig.from_dict({"r": 4, "some_future_option": 3})


def test_corrupt_config_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no adapter config"):
        LoraConfig.from_pretrained(tmp_path / "missing")


def test_peft_config_loads_in_lorakit(tmp_path):
    import peft  # a test dependency, installed by make test
    pc = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"])
    pc.save_pretrained(tmp_path)
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (8, 32, 0.1, ("query_key_value",))


def test_config_copies_and_pickles():
    import copy
    import pickle

    cfg = LoraConfig(r=4, rank_pattern={"q_proj": 2})
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(TypeError, match="read-only"):
        cfg.rank_pattern.update({"v_proj": 1})
