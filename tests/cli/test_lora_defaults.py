"""One table of LoRA defaults: LoraConfig's. A recipe's lora section and `lorakit inspect` take theirs from it,
and a shipped recipe that chooses other values says so in its YAML."""
import pytest
import yaml

from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.config import LORA_DEFAULTS
from lorakit.recipes import list_recipes, resolve_recipe
from lorakit.train.config import LoraSection, TrainConfig
from lorakit.train.recipe import load_recipe

#: recipe lora key -> LoraConfig field
SECTION_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "bias": "bias",
                  "use_rslora": "use_rslora"}


def test_the_table_is_loraconfigs_own_defaults():
    fresh = LoraConfig()
    for name, value in LORA_DEFAULTS.items():
        assert getattr(fresh, name) == value, name
    with pytest.raises(TypeError):
        LORA_DEFAULTS["r"] = 4  # read-only


def test_a_recipe_without_a_lora_section_builds_loraconfigs_defaults():
    section = LoraSection()
    for key, field in SECTION_FIELDS.items():
        assert getattr(section, key) == LORA_DEFAULTS[field], key
    from lorakit.train.run import lora_config

    built, plain = lora_config(TrainConfig()), LoraConfig()
    for field in SECTION_FIELDS.values():
        assert getattr(built, field) == getattr(plain, field), field


@pytest.mark.parametrize("name", list_recipes())
def test_a_shipped_recipe_that_chooses_other_values_says_so(name):
    cfg = load_recipe(name)
    differs = [key for key, field in SECTION_FIELDS.items() if getattr(cfg.lora, key) != LORA_DEFAULTS[field]]
    if not differs:
        return
    text = resolve_recipe(name).read_text()
    raw = yaml.safe_load(text)["lora"]
    assert all(key in raw for key in differs), f"{name}: {differs} differ from LoraConfig's defaults implicitly"
    after = text.split("\nlora:\n", 1)[1].splitlines()
    block = after[:next((i for i, line in enumerate(after) if line and not line[0].isspace()), len(after))]
    comments = [line for line in block if line.strip().startswith("#")]
    assert any("LoraConfig's defaults" in c for c in comments), \
        f"{name}: the lora section sets {differs} away from LoraConfig's defaults without a comment saying why"


def test_inspect_dry_run_shows_the_defaults(tiny_model_dir, capsys):
    assert main(["inspect", "--model", str(tiny_model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:7] == ["module", "kind", "in", "out", "r", "alpha", "params"]
    rows = [line.split() for line in lines[2:] if line.strip() and "proj" in line.split()[0]]
    assert rows, lines
    for row in rows:
        assert int(row[4]) == LORA_DEFAULTS["r"] and float(row[5]) == LORA_DEFAULTS["lora_alpha"], row


def test_inspect_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"LoRA rank (default {LORA_DEFAULTS['r']})" in out
    assert f"LoRA alpha (default {LORA_DEFAULTS['lora_alpha']:g})" in out

