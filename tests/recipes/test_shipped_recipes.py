import pytest

from lorakit.recipes import list_recipes, resolve_recipe
from lorakit.train.config import TrainConfig
from lorakit.train.recipe import load_recipe


def test_the_three_jobs_are_shipped():
    assert {"job_a_alpaca_zh", "job_b_raft", "demo"} <= set(list_recipes())


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_parses(name):
    cfg = load_recipe(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.train and cfg.model.name and cfg.description
    assert load_recipe(resolve_recipe(name)) == cfg
    assert load_recipe(f"{name}.yaml") == cfg


def test_job_specs():
    a = load_recipe("job_a_alpaca_zh")
    assert (a.model.name, a.data.train, a.data.template, a.data.max_length) == (
        "Langboat/bloom-1b4-zh", "shibing624/alpaca-zh", "human_assistant", 256)
    assert (a.lora.r, a.lora.alpha, a.lora.dropout, a.lora.target_modules) == (8, 32, 0.1, None)
    from lorakit.targets import default_target_modules
    assert tuple(default_target_modules("bloom")) == ("query_key_value",)  # the seed's target on its model
    b = load_recipe("job_b_raft")
    assert b.model.name == "bigscience/bloomz-560m" and b.data.template == "classification"
    assert b.data.max_length == 64 and b.data.label_names == ("complaint", "no complaint")
    assert b.data.template_args["text_column"] == "Tweet text"
    d = load_recipe("demo")
    assert d.model.name == "embedded" and d.data.train.startswith("builtin:")
