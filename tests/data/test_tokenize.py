"""tokenize_records: answer-only labels, exact prompt/answer boundary, BOS once, truncation counts."""
import json

import pytest

from lorakit.data import Records, get_template, load_records, tokenize_records
from lorakit.errors import ConfigError, DataError

from .conftest import ALPACA_ZH, RAFT_DIR  # paths under ../shared/data (the shared_data fixture)

CLS = get_template("classification", text_column="Tweet text", label_column="Label")


def answer_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex["labels"] if t != -100])


def test_labels_mask_prompt_and_keep_answer_plus_eos(tokenizer, shared_data):
    recs = load_records(shared_data(f"{RAFT_DIR}/train.csv"), label_column="Label")
    data = tokenize_records(recs, CLS, tokenizer, max_length=256)
    assert len(data) == 50 and data.n_truncated == 0 and data.n_dropped == 0
    for rec, ex in zip(recs, data):
        prompt, answer = CLS.render(rec)
        assert answer_text(tokenizer, ex) == answer + tokenizer.eos_token
        n_prompt = ex["labels"].count(-100)
        # the boundary is exact: the prompt part is the prompt tokenised alone
        assert ex["input_ids"][:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["input_ids"][-1] == tokenizer.eos_token_id


def test_add_eos_false(tokenizer):
    data = tokenize_records([{"instruction": "a", "output": "yes"}], get_template("human_assistant"), tokenizer,
                            64, add_eos=False)
    assert answer_text(tokenizer, data[0]) == "yes"


def test_alpaca_zh_all_records(tokenizer, shared_data):
    recs = load_records(shared_data(ALPACA_ZH))
    data = tokenize_records(recs, get_template("human_assistant"), tokenizer, max_length=4096)
    assert len(data) + data.n_dropped == 1000
    assert data.n_dropped == 0
    ex = data[0]
    assert answer_text(tokenizer, ex) == recs[0]["output"] + "<|im_end|>"


def test_chat_template_gets_a_single_eos(tokenizer):
    rec = {"instruction": "Say hi", "input": "", "output": "hi"}
    data = tokenize_records([rec], get_template("chat"), tokenizer, 128)
    assert answer_text(tokenizer, data[0]) == "hi<|im_end|>"
    assert data[0]["input_ids"].count(tokenizer.eos_token_id) == 3  # system, user, assistant turns


@pytest.fixture
def bos_tokenizer(embedded_model_dir):
    """The SmolLM2 tokenizer made to add a BOS (<|im_start|>, id 1) by itself, like Llama's."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)])
    assert tok("x")["input_ids"][0] == 1
    return tok


def test_bos_goes_once_at_the_start(bos_tokenizer):
    rec = {"instruction": "a", "output": "b"}
    ex = tokenize_records([rec], get_template("human_assistant"), bos_tokenizer, 64)[0]
    assert ex["input_ids"][0] == 1 and ex["input_ids"].count(1) == 1
    assert ex["labels"][0] == -100
    # a chat template that already writes the BOS text does not get a second one
    ex = tokenize_records([rec], get_template("chat"), bos_tokenizer, 128)[0]
    assert ex["input_ids"][:2] != [1, 1]


def test_truncation_cuts_prompt_middle_and_keeps_answer(tokenizer, caplog):
    long = " ".join(f"word{i}" for i in range(200))
    recs = [{"Tweet text": long, "Label": "no complaint"}, {"Tweet text": "short", "Label": "complaint"}]
    full = tokenize_records(recs, CLS, tokenizer, 4096)[0]
    data = tokenize_records(recs, CLS, tokenizer, max_length=32)
    assert data.n_truncated == 1 and data.n_dropped == 0 and len(data) == 2
    ex = data[0]
    assert len(ex["input_ids"]) == 32
    assert answer_text(tokenizer, ex) == "no complaint<|im_end|>"
    n_prompt = ex["labels"].count(-100)
    head = n_prompt // 2
    full_prompt = full["input_ids"][:full["labels"].count(-100)]
    assert ex["input_ids"][:head] == full_prompt[:head]  # start kept ("Tweet text : ...")
    assert ex["input_ids"][head:n_prompt] == full_prompt[len(full_prompt) - (n_prompt - head):]  # "... Label : "
    assert tokenizer.decode(ex["input_ids"][:n_prompt]).endswith("Label : ")
    assert "1 of 2 examples truncated to fit max_length=32 (0 with the answer's end cut" in caplog.text


def test_left_truncation_keeps_tail(tokenizer):
    recs = [{"Tweet text": " ".join(["x"] * 100), "Label": "complaint"}]
    ex = tokenize_records(recs, CLS, tokenizer, 16, truncation="left")[0]
    assert len(ex["input_ids"]) == 16
    assert tokenizer.decode(ex["input_ids"]).endswith("x Label : complaint<|im_end|>")


def test_label_that_cannot_fit_is_dropped_and_counted(tokenizer, caplog):
    # a class label is never cut: an example whose label (+ EOS) leaves no room for the text is dropped
    recs = Records([{"Tweet text": "t", "Label": "a " * 50}, {"Tweet text": "t", "Label": "ok"}],
                   source="mem", locations=["mem line 1", "mem line 2"])
    data = tokenize_records(recs, CLS, tokenizer, 20)
    assert data.n_dropped == 1 and data.dropped == [0] and len(data) == 1 and data.n_empty == 0
    assert "1 dropped" in caplog.text and "mem line 1" in caplog.text
    with pytest.raises(DataError, match="all 1 examples were dropped.*1 whose answer cannot fit.*data.max_length"):
        tokenize_records(recs[:1], CLS, tokenizer, 20)


def test_long_answer_is_truncated_not_dropped(tokenizer, caplog):
    # the seed notebook: (prompt + answer + eos)[:MAX_LENGTH], the example kept
    ha = get_template("human_assistant")
    recs = Records([{"instruction": "q", "output": "a " * 50}, {"instruction": "q", "output": "ok"}],
                   source="mem", locations=["mem line 1", "mem line 2"])
    full = tokenize_records(recs, ha, tokenizer, 4096)[0]
    data = tokenize_records(recs, ha, tokenizer, 20)
    assert len(data) == 2 and data.n_dropped == 0 and data.n_truncated == 1 and data.n_answer_truncated == 1
    ex = data[0]
    assert len(ex["input_ids"]) == 20
    n_prompt = ex["labels"].count(-100)
    assert ex["input_ids"][:n_prompt] == full["input_ids"][:n_prompt]  # the short prompt is kept whole
    assert tokenizer.decode(ex["input_ids"][:n_prompt]) == "Human: q\n\nAssistant: "
    assert ex["input_ids"] == full["input_ids"][:20] and ex["labels"] == full["labels"][:20]  # the answer's head
    assert tokenizer.eos_token_id not in ex["input_ids"]  # cut: no EOS, the answer did not end there
    assert "1 of 2 examples truncated to fit max_length=20 (1 with the answer's end cut" in caplog.text
    assert "0 dropped" in caplog.text


@pytest.mark.parametrize("truncation", ["middle", "left"])
def test_long_prompt_and_long_answer_share_max_length(tokenizer, truncation):
    # the prompt is cut the configured way down to half of max_length, the answer gets the rest
    ha = get_template("human_assistant")
    rec = {"instruction": " ".join(f"word{i}" for i in range(100)), "output": " ".join(f"ans{i}" for i in range(100))}
    full = tokenize_records([rec], ha, tokenizer, 4096)[0]
    full_prompt = full["input_ids"][:full["labels"].count(-100)]
    full_answer = full["input_ids"][len(full_prompt):]
    ex = tokenize_records([rec], ha, tokenizer, 40, truncation=truncation)[0]
    n_prompt = ex["labels"].count(-100)
    assert len(ex["input_ids"]) == 40 and n_prompt == 20
    prompt = ex["input_ids"][:n_prompt]
    assert tokenizer.decode(prompt).endswith("\n\nAssistant: ")  # the cue before the answer survives
    if truncation == "middle":
        assert prompt[:10] == full_prompt[:10]  # "Human: word0 ..." too
    assert prompt[-10:] == full_prompt[-10:]
    assert ex["input_ids"][n_prompt:] == full_answer[:20] and ex["labels"][n_prompt:] == full_answer[:20]


def test_long_prompt_with_short_answer_keeps_the_answer_whole(tokenizer):
    ha = get_template("human_assistant")
    rec = {"instruction": " ".join(f"word{i}" for i in range(100)), "output": "short answer"}
    ex = tokenize_records([rec], ha, tokenizer, 40)[0]
    assert len(ex["input_ids"]) == 40
    assert answer_text(tokenizer, ex) == "short answer<|im_end|>"


def test_alpaca_zh_at_the_job_a_max_length_keeps_every_example(tokenizer, shared_data):
    # job_a_alpaca_zh.yaml: human_assistant, max_length 256. Before: 483 of the 1000 dropped (answer too long).
    recs = load_records(shared_data(ALPACA_ZH))
    data = tokenize_records(recs, get_template("human_assistant"), tokenizer, max_length=256)
    assert len(data) == 1000 and data.n_dropped == 0
    assert 0 < data.n_answer_truncated <= data.n_truncated
    assert all(len(ex["input_ids"]) <= 256 for ex in data)
    for ex in data:
        n_prompt = ex["labels"].count(-100)
        assert tokenizer.decode(ex["input_ids"][:n_prompt]).endswith("Assistant: ")
        assert len(ex["input_ids"]) - n_prompt >= 1


# ---------------------------------------------------------------- records with nothing to train on

def test_null_and_blank_answers_are_dropped_with_one_warning(tokenizer, tmp_path, caplog):
    rows = [{"instruction": "a", "input": "", "output": "fine"},
            {"instruction": "b", "input": "", "output": None},          # line 2: null answer
            {"instruction": "c", "input": "", "output": ""},            # line 3
            {"instruction": "d", "input": "", "output": "  \n "},       # line 4: blank after stripping
            {"instruction": None, "input": "some text", "output": "x"},  # kept: empty instruction, has input
            {"instruction": None, "input": "", "output": "y"},          # line 6: no instruction, no input
            {"instruction": "g", "output": 123}]                        # kept: a number is an answer
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = list(load_records(path))  # as train/run.py does: a plain list keeps the locations
    data = tokenize_records(recs, get_template("human_assistant"), tokenizer, 64)
    assert len(data) == 3 and data.n_empty == 4 and data.n_dropped == 4 and data.dropped == [1, 2, 3, 5]
    assert [answer_text(tokenizer, ex) for ex in data] == ["fine<|im_end|>", "x<|im_end|>", "123<|im_end|>"]
    assert tokenizer.decode(data[1]["input_ids"][:data[1]["labels"].count(-100)]) == \
        "Human: some text\n\nAssistant: "
    warnings = [r.getMessage() for r in caplog.records if "nothing to train on" in r.getMessage()]
    assert len(warnings) == 1
    assert "dropped 4 of 7 records" in warnings[0] and "a.jsonl line 2 ('output')" in warnings[0]
    assert "'instruction' (and no 'input') x1" in warnings[0]


def test_classification_null_text_or_label_is_dropped(tokenizer, caplog):
    recs = [{"Tweet text": None, "Label": "complaint"}, {"Tweet text": " ", "Label": "complaint"},
            {"Tweet text": "late again", "Label": None}, {"Tweet text": "late again", "Label": ""},
            {"Tweet text": "thanks", "Label": "no complaint"}]
    data = tokenize_records(recs, CLS, tokenizer, 64)
    assert len(data) == 1 and data.n_empty == 4 and data.dropped == [0, 1, 2, 3]
    assert answer_text(tokenizer, data[0]) == "no complaint<|im_end|>"
    assert "'Tweet text' x2" in caplog.text and "'Label' x2" in caplog.text and "e.g. record 0" in caplog.text


def test_all_answers_empty_is_an_error(tokenizer):
    with pytest.raises(DataError, match=r"all 2 examples were dropped: 2 with nothing to train on"):
        tokenize_records([{"instruction": "q", "output": None}, {"instruction": "q", "output": ""}],
                         get_template("alpaca"), tokenizer, 64)


def test_empty_answer_without_eos_is_dropped(tokenizer):
    recs = [{"instruction": "q", "output": ""}, {"instruction": "q", "output": "x"}]
    data = tokenize_records(recs, get_template("human_assistant"), tokenizer, 64, add_eos=False)
    assert data.n_dropped == 1 and len(data) == 1


def test_missing_answer_field_names_the_row(tokenizer, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "q", "output": "x"}\n{"instruction": "q", "response": "y"}\n')
    with pytest.raises(DataError, match=r"a.jsonl line 2: no answer field 'output' to train on; fields there: "
                                        r"\['instruction', 'response'\]"):
        tokenize_records(load_records(path), get_template("alpaca"), tokenizer, 64)


def test_render_error_names_the_row(tokenizer, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("tweet,label\nhello,yes\n")
    with pytest.raises(DataError, match=r"c.csv row 1 \(line 2\): record has no text column 'text'.*"
                                        r"recipe: data.template_args.text_column"):
        tokenize_records(load_records(path), get_template("classification"), tokenizer, 64)


def test_locations_survive_a_plain_list_a_subset_and_a_split(tokenizer, tmp_path):
    # train/run.py: list(load_records(...)), then random subsets / an eval split of that list
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": "x"}) for i in range(5)]
    lines.append(json.dumps({"instruction": "q5"}))  # record 5, line 6
    path.write_text("\n".join(lines) + "\n")
    recs = list(load_records(path))
    for subset in (recs, recs[3:], [recs[i] for i in (0, 5)]):
        with pytest.raises(DataError, match=r"a.jsonl line 6: no answer field 'output' to train on.*"
                                            r"recipe: data.template_args.output_column"):
            tokenize_records(subset, get_template("alpaca"), tokenizer, 64)
    # records passed in memory that were read from a file keep their place too
    assert load_records(recs[4:]).location(1) == f"{path} line 6"


def test_render_error_names_the_row_after_list(tokenizer, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("message,category\nhello,billing\nbye,shipping\n")
    recs = list(load_records(path, label_column="category"))[1:]
    with pytest.raises(DataError, match=r"c.csv row 2 \(line 3\): record has no text column 'msg'"):
        tokenize_records(recs, get_template("classification", text_column="msg", label_column="category"),
                         tokenizer, 64)


def test_bad_max_length(tokenizer):
    with pytest.raises(ConfigError, match="max_length must be an integer >= 2"):
        tokenize_records([{"instruction": "q", "output": "x"}], get_template("alpaca"), tokenizer, 1)
