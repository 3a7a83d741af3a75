"""heldout_loss: token-weighted over answer tokens, independent of batching, under eval/no-grad."""
import math

import pytest
import torch

from lorakit.data import Collator, get_template, tokenize_records
from lorakit.errors import DataError
from lorakit.eval import heldout_loss

CLS = get_template("classification", text_column="Tweet text", label_column="Label")


def reference_loss(model, data):
    """Sum of per-token answer cross-entropy over all examples, one example at a time, via transformers."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in data:
            labels = torch.tensor([ex["labels"]])
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            total += out.loss.item() * k
            n += k
    return total / n, n


def test_matches_per_example_reference_and_batching(tiny_llama, tokenizer, raft_records):
    data = tokenize_records(raft_records[:6], CLS, tokenizer, 128)
    ref, n = reference_loss(tiny_llama, data)
    tiny_llama.train()
    res = heldout_loss(tiny_llama, data, Collator(tokenizer.pad_token_id), batch_size=4)
    assert res["tokens"] == n == data.n_answer_tokens
    assert res["loss"] == pytest.approx(ref, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert tiny_llama.training
    res1 = heldout_loss(tiny_llama, data, Collator(tokenizer.pad_token_id, pad_to_multiple_of=8), batch_size=1)
    assert res1["loss"] == pytest.approx(res["loss"], rel=1e-5)


class Wrapper(torch.nn.Module):
    """A model wrapper that only exposes forward (returning a dict), like an adapter wrapper might."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return {"logits": self.inner(**kw).logits}


def test_works_through_a_wrapper(tiny_llama, tokenizer, raft_records):
    data = tokenize_records(raft_records[:4], CLS, tokenizer, 128)
    direct = heldout_loss(tiny_llama, data, Collator(tokenizer.pad_token_id))
    wrapped = heldout_loss(Wrapper(tiny_llama), data, Collator(tokenizer.pad_token_id))  # through the logits
    assert wrapped["tokens"] == direct["tokens"]
    assert wrapped["loss"] == pytest.approx(direct["loss"], rel=1e-6)                 # fast path agrees


def test_empty_dataset():
    with pytest.raises(DataError, match="empty dataset"):
        heldout_loss(torch.nn.Linear(1, 1), [], Collator(0))
