"""Collator: dynamic padding to the batch's longest, masks, -100 labels on padding."""
import pytest
import torch

from lorakit.data import Collator
from lorakit.errors import ConfigError

EX = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]}]


def test_right_padding_to_longest_in_batch():
    b = Collator(pad_token_id=0, max_length=512)(EX)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert all(v.dtype == torch.long for v in b.values())


def test_left_padding():
    b = Collator(pad_token_id=2, padding_side="left")(EX)
    assert b["input_ids"].tolist() == [[2, 2, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b["labels"][0].tolist() == [-100, -100, -100, 6, 7]


def test_pad_to_multiple_of_and_max_length_cap():
    assert Collator(0, pad_to_multiple_of=8)(EX)["input_ids"].shape == (2, 8)
    assert Collator(0, pad_to_multiple_of=8, max_length=6)(EX)["input_ids"].shape == (2, 6)
    b = Collator(0, max_length=4)(EX)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 10, 11]]


def test_no_labels_for_inference_batches():
    b = Collator(0, padding_side="left")([{"input_ids": [1]}, {"input_ids": [1, 2]}])
    assert set(b) == {"input_ids", "attention_mask"}


def test_with_dataloader():
    loader = torch.utils.data.DataLoader(EX, batch_size=2, collate_fn=Collator(0))
    assert next(iter(loader))["input_ids"].shape == (2, 5)


def test_bad_settings():
    with pytest.raises(ConfigError, match="pad_token_id.*eos_token_id"):
        Collator(None)
    with pytest.raises(ConfigError, match="padding_side"):
        Collator(0, padding_side="middle")
