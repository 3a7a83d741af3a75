"""Every field of peft's LoraConfig has an answer in lorakit, and adapter configs are read by it.

A key lorakit has no field for loads at a neutral value and is refused (by name, with lorakit's
version) otherwise; the README's table is generated from the same code and checked here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import warnings

import pytest

peft = pytest.importorskip("peft")  # the oracle: a test dependency

import lorakit  # noqa: E402
from lorakit import ConfigError, LoraConfig  # noqa: E402
from lorakit.peft_fields import FOREIGN, markdown_table, neutral_defaults  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- peft-fields:start -->\n", "<!-- peft-fields:end -->\n"


def _peft_defaults() -> dict:
    out = {}
    for name, f in peft.LoraConfig.__dataclass_fields__.items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
    return out


def _ours() -> set[str]:
    return {f.name for f in dataclasses.fields(LoraConfig)}


def test_every_peft_field_has_an_answer():
    missing = [n for n in peft.LoraConfig.__dataclass_fields__ if n not in _ours() and n not in FOREIGN]
    assert not missing, f"peft fields lorakit says nothing about (add them to lorakit.peft_fields.FOREIGN): {missing}"


def test_peft_defaults_are_neutral():
    defaults = _peft_defaults()
    defaults.pop("peft_type")  # None in the dataclass, "LORA" once built (what files hold)
    assert neutral_defaults(defaults) == []


def test_a_peft_default_config_file_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert (cfg.r, cfg.target_modules) == (4, ("q_proj",))


@pytest.mark.parametrize("key,value", [
    ("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 2]]), ("megatron_config", {"a": 1}),
    ("peft_type", "IA3"), ("arrow_config", {"top_k": 2}), ("alora_invocation_tokens", [5, 6]),
])
def test_a_variant_lorakit_lacks_is_refused_by_name(key, value):
    with pytest.raises(ConfigError) as err:
        LoraConfig.from_dict({"r": 4, key: value})
    msg = str(err.value)
    assert f"{key}={value!r}" in msg and f"lorakit {lorakit.__version__}" in msg


@pytest.mark.parametrize("value", [None, False, [], {}, ""])
def test_an_unknown_key_at_a_neutral_value_loads(value):
    assert LoraConfig.from_dict({"r": 4, "future_knob": value, "peft_version": "99.0"}).r == 4


@pytest.mark.parametrize("value", [True, 3, "on", [1], {"a": 1}])
def test_an_unknown_key_set_to_anything_else_is_refused(value):
    with pytest.raises(ConfigError) as err:
        LoraConfig.from_dict({"r": 4, "future_knob": value, "peft_version": "99.0"})
    msg = str(err.value)
    assert f"future_knob={value!r}" in msg and "peft 99.0" in msg and f"lorakit {lorakit.__version__}" in msg


def test_neutral_needs_the_same_type():
    """0 is not False and 1 is not True: a number where peft writes a flag is not taken as the flag."""
    with pytest.raises(ConfigError, match="lora_bias=0"):
        LoraConfig.from_dict({"r": 4, "lora_bias": 0})


def test_readme_table_is_generated_from_the_code():
    table = markdown_table(sorted(_ours()), list(peft.LoraConfig.__dataclass_fields__))
    for name in peft.LoraConfig.__dataclass_fields__:
        assert f"| `{name}` |" in table
    text = README.read_text()
    assert START in text and END in text, "README lost its peft-fields markers"
    head, rest = text.split(START, 1)
    current, tail = rest.split(END, 1)
    if current != table and os.environ.get("LORAKIT_WRITE_README") == "1":
        README.write_text(head + START + table + END + tail)
        current = table
    assert current == table, "README's peft-fields table is stale: rerun this test with LORAKIT_WRITE_README=1"
    assert re.search(r"\| `use_dora` \| supported", current)
