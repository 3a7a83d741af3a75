"""The chat template travels with the adapter: save_chat_template / load_chat_template."""
import json
import os

import pytest

from lorakit.data.chat_template import CHAT_TEMPLATE_FILE, load_chat_template, save_chat_template
from lorakit.errors import DataError


class Tok:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_round_trip_writes_only_the_file(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    path = save_chat_template(Tok(template), tmp_path / "adapter")
    assert path == tmp_path / "adapter" / CHAT_TEMPLATE_FILE
    assert os.listdir(tmp_path / "adapter") == [CHAT_TEMPLATE_FILE]  # no temporary file left behind
    assert load_chat_template(tmp_path / "adapter") == template


def test_no_template_writes_nothing_and_reads_none(tmp_path):
    assert save_chat_template(Tok(None), tmp_path) is None and os.listdir(tmp_path) == []
    assert load_chat_template(tmp_path) is None
    assert save_chat_template(Tok({"default": "D", "tool_use": "T"}), tmp_path).read_text() == "D"


def test_older_places_are_read(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert load_chat_template(tmp_path) == "from config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("jinja first")
    assert load_chat_template(tmp_path) == "jinja first"


def test_a_broken_config_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(DataError, match="tokenizer_config.json: not a JSON object"):
        load_chat_template(tmp_path)


def test_the_embedded_tokenizers_template_round_trips(tokenizer, tmp_path):
    save_chat_template(tokenizer, tmp_path)
    assert load_chat_template(tmp_path) == tokenizer.chat_template
