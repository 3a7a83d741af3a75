"""Batching with dynamic padding: each batch is padded to its own longest example, not to max_length.

Padding to a fixed max_length makes every step pay for the longest possible sequence; padding per
batch costs only what the batch needs (and ``pad_to_multiple_of=8`` keeps shapes tensor-core friendly).
"""
from __future__ import annotations

from typing import Any

from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.errors import ConfigError

__all__ = ["Collator"]


class Collator:
    """``collate_fn`` for a DataLoader: pads ``input_ids`` (with ``pad_token_id``), builds
    ``attention_mask`` (1 = real token) and pads ``labels`` with -100 (when the examples have labels).

    ``padding_side``: "right" for training, "left" for batched generation.
    ``max_length``: examples longer than this are cut (keeping their start for right padding, their
    end for left padding); tokenize_records already keeps examples within its own max_length.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 max_length: int | None = None):
        if pad_token_id is None or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ConfigError(f"pad_token_id must be a token id (int >= 0), got {pad_token_id!r}; the tokenizer "
                              "may have no pad token: pass pad_token_id=tokenizer.eos_token_id.")
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of!r}.")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"max_length must be >= 1 or None, got {max_length!r}.")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def _target_length(self, longest: int) -> int:
        n = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = -(-n // m) * m
        if self.max_length is not None:
            n = min(n, self.max_length)
        return n

    def _clip(self, seq: list[int]) -> list[int]:
        if self.max_length is None or len(seq) <= self.max_length:
            return seq
        return seq[:self.max_length] if self.padding_side == "right" else seq[len(seq) - self.max_length:]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("Collator got an empty batch.")
        has_labels = "labels" in examples[0]
        ids = [self._clip(list(ex["input_ids"])) for ex in examples]
        labels = [self._clip(list(ex["labels"])) for ex in examples] if has_labels else None
        if has_labels and any(len(a) != len(b) for a, b in zip(ids, labels)):
            raise ValueError("an example's labels and input_ids differ in length; build examples with "
                             "lorakit.data.tokenize_records.")
        length = self._target_length(max(len(x) for x in ids))
        batch_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        batch_labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for row, seq in enumerate(ids):
            n = len(seq)
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            batch_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
            if has_labels:
                batch_labels[row, cols] = torch.tensor(labels[row], dtype=torch.long)
        out = {"input_ids": batch_ids, "attention_mask": mask}
        if has_labels:
            out["labels"] = batch_labels
        return out
