"""classification_eval: a real (tiny, random) model end to end, and a fake model with known outputs."""
import pytest
import torch

from lorakit.data import Records, get_template
from lorakit.errors import DataError
from lorakit.eval import INVALID, classification_eval, normalize_label

from .conftest import LABELS

CLS = get_template("classification", text_column="Tweet text", label_column="Label")


def test_tiny_random_llama_end_to_end(tiny_llama, tokenizer, raft_records):
    tiny_llama.train()
    recs = raft_records[:8]
    rep = classification_eval(tiny_llama, tokenizer, recs, CLS, LABELS, batch_size=3)
    assert 0.0 <= rep.accuracy <= 1.0 and rep.n == 8
    assert set(rep.predictions) <= set(LABELS) | {INVALID}
    assert set(rep.per_class) == set(LABELS)
    assert sum(c["support"] for c in rep.per_class.values()) == 8
    table = rep.table()
    assert "complaint" in table and "no complaint" in table and "precision" in table and "accuracy" in table
    assert tiny_llama.training  # the training flag is restored
    # left-padded batches give the same greedy outputs as one record at a time
    one = classification_eval(tiny_llama, tokenizer, recs[:3], CLS, LABELS, batch_size=1)
    assert one.outputs == rep.outputs[:3]


class FakeModel:
    """Stands in for a causal LM: generate() appends fixed token ids per prompt (keyed by prompt length order)."""

    def __init__(self, tokenizer, answers_by_text: dict[str, str]):
        self.tok = tokenizer
        self.answers = answers_by_text
        self.calls = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kw})
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([t for t, m in zip(ids, mask) if m])
            text = next(v for k, v in self.answers.items() if k in prompt)
            new = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(ids + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def test_known_answers_exact_match_and_normalisation(tokenizer):
    recs = Records([{"Tweet text": t, "Label": l} for t, l in [
        ("A", "complaint"), ("BB bb", "complaint"), ("C", "no complaint"), ("DDD ddd ddd", "no complaint"),
        ("E", "complaint")]], source="mem")
    model = FakeModel(tokenizer, {
        "A Label": " Complaint.",             # case, leading space, trailing punctuation -> complaint (right)
        "BB bb Label": "no complaint\nTweet",  # first line only -> no complaint (wrong)
        "C Label": "NO  COMPLAINT!",           # inner whitespace collapsed -> no complaint (right)
        "DDD ddd ddd Label": "banana",         # outside the label set -> <invalid> (wrong)
        "E Label": "complaint",                # exact (right)
    })
    rep = classification_eval(model, tokenizer, recs, CLS, LABELS, batch_size=2)
    assert rep.predictions == ["complaint", "no complaint", "no complaint", INVALID, "complaint"]
    assert rep.references == ["complaint", "complaint", "no complaint", "no complaint", "complaint"]
    assert rep.accuracy == pytest.approx(3 / 5) and rep.n == 5 and rep.n_invalid == 1
    c, n = rep.per_class["complaint"], rep.per_class["no complaint"]
    assert (c["precision"], c["recall"], c["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert c["f1"] == pytest.approx(0.8)
    assert (n["precision"], n["recall"], n["support"]) == (0.5, 0.5, 2)
    assert "1 invalid" in rep.table() and "accuracy 0.600 (3/5)" in rep.table()
    # greedy, left padding, default max_new_tokens = longest label's tokens + 2
    call = model.calls[0]
    longest = max(len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in LABELS)
    assert call["max_new_tokens"] == longest + 2 and call["do_sample"] is False
    masks = [c["attention_mask"] for c in model.calls]
    assert any(m[:, 0].eq(0).any() for m in masks)  # some row is padded, on the left
    assert all(m[:, -1].eq(1).all() for m in masks)


def test_reference_label_outside_the_set(tokenizer):
    recs = [{"Tweet text": "x", "Label": "praise"}]
    with pytest.raises(DataError, match=r"record 0: reference label 'praise' is not in the label set"):
        classification_eval(FakeModel(tokenizer, {"": "x"}), tokenizer, recs, CLS, LABELS)


@pytest.mark.parametrize("raw, expected", [
    (" Complaint.", "complaint"), ("no complaint<|im_end|>", "no complaint<|im_end|>"),
    ("No   Complaint !\nmore", "no complaint"), ('"complaint"', "complaint"), ("", "")])
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected
