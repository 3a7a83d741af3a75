import pytest

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, config_from_dict, field_help, valid_keys
from lorakit.train.recipe import dump_recipe, load_recipe


def test_defaults_and_overrides_are_typed():
    cfg = config_from_dict({}, ["lora.r=16", "train.lr=3e-4", "train.progress=false", "model=embedded",
                                "lora.target_modules=q_proj,v_proj", "eval.every_steps=null",
                                "data.template_args={text_column: Tweet text}", "train.max_steps=7"])
    assert cfg.lora.r == 16 and isinstance(cfg.lora.r, int)
    assert cfg.train.lr == 3e-4
    assert cfg.train.progress is False
    assert cfg.model.name == "embedded"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.eval.every_steps is None
    assert cfg.data.template_args == {"text_column": "Tweet text"}
    assert cfg.train.max_steps == 7


def test_yaml_values_are_checked_and_shorthand_works():
    cfg = config_from_dict({"model": "some/model", "train": {"lr": "2e-4", "epochs": 1},
                            "lora": {"target_modules": ["query_key_value"]}})
    assert cfg.model.name == "some/model"
    assert cfg.train.lr == 2e-4 and cfg.train.epochs == 1.0
    assert cfg.lora.target_modules == ("query_key_value",)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, ["lora.rank=4"])
    msg = str(e.value)
    assert "lora.rank" in msg and "lora.r" in msg and "train.lr" in msg
    with pytest.raises(ConfigError, match="unknown recipe key 'optimizer'"):
        config_from_dict({"optimizer": {"lr": 1}})


@pytest.mark.parametrize("item, key, expected", [
    ("lora.r=big", "lora.r", "int"),
    ("train.lr=fast", "train.lr", "number"),
    ("train.cpu=maybe", "train.cpu", "true/false"),
    ("train.scheduler=step", "train.scheduler", "one of"),
    ("data.template_args=3", "data.template_args", "mapping"),
])
def test_bad_values_name_key_and_type(item, key, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [item])
    assert key in str(e.value) and expected in str(e.value)


def test_yaml_type_errors_name_key():
    with pytest.raises(ConfigError, match="train.batch_size expects int"):
        config_from_dict({"train": {"batch_size": "eight"}})
    with pytest.raises(ConfigError, match="train.cpu expects bool"):
        config_from_dict({"train": {"cpu": "yes please"}})


def test_validation_names_the_fix():
    with pytest.raises(ConfigError, match=r"lora.r = 0 must be >= 1.*--set lora.r="):
        config_from_dict({}, ["lora.r=0"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_dict({}, ["lora.r"])
    with pytest.raises(ConfigError, match="is a section"):
        config_from_dict({}, ["train=3"])


def test_every_field_documented():
    for key in valid_keys():
        _, help = field_help(key)
        assert help, key


def test_round_trip(tmp_path):
    cfg = config_from_dict({}, ["lora.r=4", "data.label_names=a,b"])
    dump_recipe(cfg, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again == cfg
    assert again.is_classification and isinstance(again, TrainConfig)


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(ConfigError, match="job_b_raft"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize("override,key", [("train.betas=a,b", "train.betas"), ("train.betas=[0.9,1.5]", "train.betas"),
                                          ("train.betas=[0.9]", "train.betas"),
                                          ("train.weight_decay=-1", "train.weight_decay")])
def test_adamw_settings_are_checked_with_the_recipe(override, key):
    from lorakit.errors import ConfigError
    from lorakit.train.config import config_from_dict

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({}, [override])


# ---------------------------------------------------------------------------------------------- precision


def test_precision_defaults_to_auto_and_model_dtype_follows_it():
    cfg = TrainConfig()
    assert cfg.train.precision == "auto" and cfg.model.dtype == "auto"
    for precision in ("auto", "fp32", "bf16"):
        assert config_from_dict({}, [f"train.precision={precision}"]).train.precision == precision
    _, help = field_help("train.precision")
    assert "bfloat16" in help and "float32" in help and "precision.json" in help


def test_a_bad_precision_names_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"train\.precision expects one of 'auto', 'fp32', 'bf16', got 'fp8'"):
        config_from_dict({}, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"model\.dtype expects one of 'auto', 'float32', 'bfloat16', 'float16'"):
        config_from_dict({"model": {"dtype": "int8"}})


@pytest.mark.parametrize("precision, dtype", [("fp32", "bfloat16"), ("fp32", "float16"), ("bf16", "float32"),
                                              ("bf16", "float16")])
def test_an_explicit_dtype_that_contradicts_an_explicit_precision_is_refused(precision, dtype):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [f"train.precision={precision}", f"model.dtype={dtype}"])
    msg = str(e.value)
    assert f"model.dtype = '{dtype}' contradicts train.precision = '{precision}'" in msg
    assert "Fix: drop model.dtype" in msg and "train.precision=auto" in msg


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bfloat16"), ("auto", "float16"),
                                              ("auto", "bfloat16"), ("auto", "float32")])
def test_agreeing_or_auto_precision_takes_the_dtype(precision, dtype):
    cfg = config_from_dict({}, [f"train.precision={precision}", f"model.dtype={dtype}"])
    assert (cfg.train.precision, cfg.model.dtype) == (precision, dtype)


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_over_bf16_weights_is_refused_with_the_fix(autocast):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, ["train.precision=bf16", f"train.mixed_precision={autocast}"])
    msg = str(e.value)
    assert f"train.mixed_precision = '{autocast}'" in msg and "train.precision = 'bf16'" in msg
    assert "--set train.mixed_precision=no" in msg and "--set train.precision=fp32" in msg
    # autocast over float32 weights stays possible, explicitly or under auto (which then keeps float32)
    assert config_from_dict({}, ["train.precision=fp32", f"train.mixed_precision={autocast}"])
    assert config_from_dict({}, [f"train.mixed_precision={autocast}"]).train.precision == "auto"


def test_the_dumped_recipe_says_the_precision_used_and_loads_unchanged(tmp_path):
    cfg = config_from_dict({}, ["lora.r=4"])
    dump_recipe(cfg, tmp_path / "r.yaml", comment="precision: bf16 (auto: measured)")
    text = (tmp_path / "r.yaml").read_text()
    assert text.startswith("# precision: bf16 (auto: measured)\n")
    assert load_recipe(tmp_path / "r.yaml") == cfg
