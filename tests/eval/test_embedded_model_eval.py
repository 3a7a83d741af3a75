"""The real embedded SmolLM2-135M on real RAFT rows (slow: minutes on a CPU)."""
import pytest

from lorakit.data import Collator, get_template, tokenize_records
from lorakit.eval import INVALID, classification_eval, heldout_loss

from .conftest import LABELS

CLS = get_template("classification", text_column="Tweet text", label_column="Label")


@pytest.mark.slow
def test_embedded_model_batched_generation_matches_one_by_one(embedded_model_dir, tokenizer, raft_records):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    recs = raft_records[:6]  # tweets of different lengths: left padding and positions must not matter
    batched = classification_eval(model, tokenizer, recs, CLS, LABELS, batch_size=6)
    single = classification_eval(model, tokenizer, recs, CLS, LABELS, batch_size=1)
    assert batched.outputs == single.outputs
    assert set(batched.predictions) <= set(LABELS) | {INVALID}
    res = heldout_loss(model, tokenize_records(recs, CLS, tokenizer, 256), Collator(tokenizer.pad_token_id))
    assert res["tokens"] == 18 and 0 < res["loss"] < 20  # 6 x (2 label tokens + EOS)
