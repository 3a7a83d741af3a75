"""Prompt templates: exact texts, column options, and errors."""
import dataclasses

import pytest

from lorakit.data import get_template
from lorakit.errors import ConfigError, DataError

REC = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
REC_IN = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}


def test_human_assistant_with_and_without_input():
    t = get_template("human_assistant")
    assert t.render(REC_IN) == ("Human: Translate.\nbonjour\n\nAssistant: ", "hello")
    # empty input: "\n".join([instruction, input]).strip() leaves no dangling newline
    assert t.render(REC) == ("Human: Name a colour.\n\nAssistant: ", "Blue.")
    # absent input and output (inference) are empty
    assert t.render({"instruction": "Hi"}) == ("Human: Hi\n\nAssistant: ", "")


def test_alpaca_with_and_without_input():
    t = get_template("alpaca")
    p, a = t.render(REC_IN)
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert p.endswith("### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n") and a == "hello"
    p, a = t.render(REC)
    assert "### Input:" not in p
    assert p == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")


def test_classification_text_label_defaults_to_column_name():
    rec = {"Tweet text": "@x my order is late", "Label": "complaint"}
    t = get_template("classification", text_column="Tweet text", label_column="Label")
    assert t.render(rec) == ("Tweet text : @x my order is late Label : ", "complaint")
    t = get_template("classification", text_column="Tweet text", label_column="Label", text_label="Tweet")
    assert t.render(rec)[0] == "Tweet : @x my order is late Label : "
    assert t.render({"Tweet text": "x"}) == ("Tweet : x Label : ", "")  # inference: no label


def test_classification_missing_text_column_lists_fields():
    t = get_template("classification")
    with pytest.raises(DataError, match=r"no text column 'text'; fields there: \['Tweet text', 'Label'\]"):
        t.render({"Tweet text": "x", "Label": "complaint"})


def test_custom_instruction_columns():
    t = get_template("human_assistant", instruction_column="q", input_column="ctx", output_column="a")
    assert t.render({"q": "Why?", "a": "Because."}) == ("Human: Why?\n\nAssistant: ", "Because.")
    with pytest.raises(DataError, match=r"no field 'q'; fields there: \['instruction', 'input', 'output'\]"):
        t.render(REC)


def test_chat_uses_tokenizer_template(tokenizer):
    t = get_template("chat")
    p, a = t.render(REC_IN, tokenizer)
    assert p == tokenizer.apply_chat_template([{"role": "user", "content": "Translate.\nbonjour"}],
                                              tokenize=False, add_generation_prompt=True)
    assert p.endswith("<|im_start|>assistant\n")
    assert a == "hello<|im_end|>"
    assert get_template("chat").render({"instruction": "Hi"}, tokenizer)[1] == ""
    p, _ = get_template("chat", system="Be brief.").render(REC, tokenizer)
    assert p.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_chat_needs_a_tokenizer():
    with pytest.raises(DataError, match="no tokenizer was given.*human_assistant"):
        get_template("chat").render(REC)


def test_templates_are_frozen():
    t = get_template("classification", text_column="Tweet text")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.text_column = "x"


def test_unknown_template_and_option():
    with pytest.raises(ConfigError, match=r"unknown prompt template 'vicuna'; choose one of \['alpaca'"):
        get_template("vicuna")
    with pytest.raises(ConfigError, match=r"no option\(s\) \['text_column'\]; its options are"):
        get_template("alpaca", text_column="x")


def test_empty_fields_name_what_a_record_lacks_for_training():
    ha = get_template("human_assistant")
    assert ha.empty_fields(REC) == []
    assert ha.empty_fields({"instruction": "q", "output": None}) == ["'output'"]
    assert ha.empty_fields({"instruction": None, "input": "text", "output": "a"}) == []
    assert ha.empty_fields({"instruction": " ", "output": 0}) == ["'instruction' (and no 'input')"]
    cls = get_template("classification", text_column="Tweet text", label_column="Label")
    assert cls.empty_fields({"Tweet text": None, "Label": ""}) == ["'Label'", "'Tweet text'"]
    with pytest.raises(DataError, match=r"recipe: data.template_args.text_column"):
        cls.render({"text": "x"})
