"""Conversation records: both formats from every reader, the column found or named, and bad records handled
as the other templates handle them (a wrong shape: an error naming the record; nothing to learn: dropped
and counted in one warning)."""
import json
import logging

import pytest

from lorakit.data import get_template, load_records, tokenize_records
from lorakit.data.conversations import find_conversation_column, read_conversation
from lorakit.errors import DataError

CHAT = get_template("chat")
U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_both_formats_and_text_parts():
    openai = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]},
              {"role": "assistant", "content": "c", "weight": 1}]
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "ab"}, {"from": "gpt", "value": "c"}]
    a, why_a = read_conversation(openai, "r")
    b, why_b = read_conversation(sharegpt, "r")
    assert a == b and why_a is why_b is None
    assert [(t.role, t.content) for t in a] == [("system", "s"), ("user", "ab"), ("assistant", "c")]
    assert read_conversation(json.dumps(sharegpt), "r")[0] == b  # a CSV cell holding the list as JSON


def test_the_column_is_named_or_found():
    assert find_conversation_column({"id": 1, "messages": [U, A]}) == "messages"
    assert find_conversation_column({"conversations": [U, A]}) == "conversations"
    assert find_conversation_column({"dialog": [U, A], "n": 2}) == "dialog"
    assert find_conversation_column({"a": [U, A], "b": [U, A]}) is None  # two candidates: not guessed
    assert find_conversation_column({"dialog": [U, A]}, "dialog") == "dialog"
    assert find_conversation_column({"messages": [U, A]}, "dialog") is None


def test_named_column_from_the_recipe(tokenizer):
    data = tokenize_records([{"turns": [U, A]}], get_template("chat", messages_column="turns"), tokenizer, 128)
    assert len(data) == 1
    with pytest.raises(DataError, match=r"record 0: no conversation column 'turns'; fields there: \['x'\]"):
        tokenize_records([{"x": 1}], get_template("chat", messages_column="turns"), tokenizer, 128)


def test_instruction_records_keep_the_single_turn_chat_path(tokenizer):
    data = tokenize_records([{"instruction": "Say hi", "output": "hi"}], CHAT, tokenizer, 128)
    assert tokenizer.decode([t for t in data[0]["labels"] if t != -100]) == "hi<|im_end|>"


def test_every_reader(tokenizer, tmp_path):
    """jsonl, a json list, one pretty-printed conversation in a .json file, and a datasets folder."""
    import datasets

    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    rows = [{"messages": [U, A]}, {"conversations": sharegpt}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    (tmp_path / "one.json").write_text(json.dumps({"id": "x", "messages": [U, A]}, indent=2))
    # a datasets column fills the keys a row lacks with None (here "weight")
    datasets.Dataset.from_list([{"messages": [U, A]}, {"messages": [U, {**A, "weight": 1}]}]).save_to_disk(
        str(tmp_path / "ds"))
    expected = tokenize_records([{"messages": [U, A]}], CHAT, tokenizer, 128)[0]
    for source in ("c.jsonl", "c.json", "one.json", "ds"):
        recs = load_records(tmp_path / source)
        data = tokenize_records(recs, CHAT, tokenizer, 128)
        assert len(data) == len(recs) and all(ex == expected for ex in data), source


@pytest.mark.parametrize("conversation,message", [
    ([U, {"role": "tool", "content": "x"}], r"line 1 column 'messages' turn 1: unknown role 'tool'"),
    ([U, U, A], r"line 1 column 'messages': turn 1 is 'user' where 'assistant' was due \(roles out of order\)"),
    ([A, U], r"turn 0 is 'assistant' where 'user' was due"),
    ([U, A, {"role": "system", "content": "s"}], r"turn 2 is 'system'"),
    ([U, "hello"], r"turn 1: a str, not an object"),
    ([U, {"text": "hello"}], r"turn 1: no 'role' \(OpenAI messages\) or 'from' \(ShareGPT\) key"),
    ([U, {"role": "assistant"}], r"turn 1: no 'content' key"),
    ([U, {"role": "assistant", "content": "a", "weight": 0.5}], r"turn 1: weight 0.5"),
    ([{**U, "weight": 0}, A], r"turn 0: weight 0 on a user turn"),
    ([U, {"role": "assistant", "content": [{"type": "image_url"}]}], r"turn 1: the content is a list"),
    ({"role": "user"}, r"a conversation is a list of turns"),
])
def test_a_record_of_the_wrong_shape_is_an_error_naming_it(tokenizer, tmp_path, conversation, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversation}, {"messages": [U, A]}])
    with pytest.raises(DataError, match=message) as err:
        tokenize_records(load_records(path), CHAT, tokenizer, 128)
    assert "bad.jsonl line 1" in str(err.value)


def test_nothing_to_learn_is_dropped_and_counted_once(tokenizer, tmp_path, caplog):
    rows = [{"messages": [U, {"role": "assistant", "content": None}]},
            {"messages": [{"role": "user", "content": None}, A]},
            {"messages": [U]},
            {"messages": [U, {"role": "assistant", "content": "  "}]},
            {"messages": [U, {**A, "weight": 0}]},
            {"messages": [U, A]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lorakit.data.chat"):
        data = tokenize_records(load_records(path), CHAT, tokenizer, 128, name="train")
    assert len(data) == 1 and data.dropped == [0, 1, 2, 3, 4] and data.n_empty == 5
    [warning] = [r.getMessage() for r in caplog.records]
    assert "dropped 5 of 6 conversations" in warning and "null content x2" in warning
    assert "no assistant turn x1" in warning and "blank assistant reply x1" in warning
    assert "c.jsonl line 1 (null content)" in warning
    with pytest.raises(DataError, match="all 1 conversations were dropped: 1 with nothing to train on"):
        tokenize_records([{"messages": [U]}], CHAT, tokenizer, 128)
