"""tokenize_records: answer-only labels, exact prompt/answer boundary, BOS once, truncation counts."""
import pytest

from lorakit.data import Records, get_template, load_records, tokenize_records
from lorakit.errors import ConfigError, DataError

from .conftest import ALPACA_ZH, RAFT_DIR

CLS = get_template("classification", text_column="Tweet text", label_column="Label")


def answer_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex["labels"] if t != -100])


def test_labels_mask_prompt_and_keep_answer_plus_eos(tokenizer, shared_data):
    recs = load_records(RAFT_DIR / "train.csv", label_column="Label")
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
    recs = load_records(ALPACA_ZH)
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
    assert "1 of 2 examples had their prompt truncated" in caplog.text


def test_left_truncation_keeps_tail(tokenizer):
    recs = [{"Tweet text": " ".join(["x"] * 100), "Label": "complaint"}]
    ex = tokenize_records(recs, CLS, tokenizer, 16, truncation="left")[0]
    assert len(ex["input_ids"]) == 16
    assert tokenizer.decode(ex["input_ids"]).endswith("x Label : complaint<|im_end|>")


def test_answer_that_cannot_fit_is_dropped_and_counted(tokenizer, caplog):
    recs = Records([{"instruction": "q", "output": "a " * 50}, {"instruction": "q", "output": "ok"}],
                   source="mem", locations=["mem line 1", "mem line 2"])
    data = tokenize_records(recs, get_template("human_assistant"), tokenizer, 20)
    assert data.n_dropped == 1 and data.dropped == [0] and len(data) == 1
    assert "1 dropped" in caplog.text and "mem line 1" in caplog.text
    with pytest.raises(DataError, match="all 1 examples were dropped.*raise max_length"):
        tokenize_records(recs[:1], get_template("human_assistant"), tokenizer, 20)


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
    with pytest.raises(DataError, match=r"c.csv row 1 \(line 2\): record has no text column 'text'"):
        tokenize_records(load_records(path), get_template("classification"), tokenizer, 64)


def test_bad_max_length(tokenizer):
    with pytest.raises(ConfigError, match="max_length must be an integer >= 2"):
        tokenize_records([{"instruction": "q", "output": "x"}], get_template("alpaca"), tokenizer, 1)
