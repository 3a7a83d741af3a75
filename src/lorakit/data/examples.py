"""What tokenisation produces (:class:`TokenizedDataset`) and the BOS rule, shared by the single-turn path
(:mod:`lorakit.data.tokenize`) and the conversation path (:mod:`lorakit.data.chat`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.constants import IGNORE_INDEX

__all__ = ["TokenizedDataset", "bos_prefix", "join_bos"]


@dataclass
class TokenizedDataset:
    """Tokenised examples ``{"input_ids": [...], "labels": [...]}`` plus what happened on the way.

    ``n_truncated``: examples shortened to fit ``max_length`` (prompt, answer or both);
    ``n_answer_truncated``: those of them whose answer's end was cut (no EOS then);
    ``n_dropped``: records left out (with nothing to train on, or a whole-answer template's answer
    could not fit); ``n_empty``: those of them left out for a null/blank answer, text or instruction;
    ``dropped``: the record indices that were left out; ``n_turns_cut``: conversations only, the
    user/assistant exchanges cut from their starts (see :mod:`lorakit.data.chat`). Indexable, so a
    DataLoader can take it as is.
    """

    examples: list[dict]
    n_truncated: int = 0
    n_dropped: int = 0
    dropped: list[int] = field(default_factory=list)
    n_answer_truncated: int = 0
    n_empty: int = 0
    n_turns_cut: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)

    @property
    def n_answer_tokens(self) -> int:
        return sum(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in self.examples)


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds a BOS by itself (add_special_tokens=True), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def join_bos(bos: list[int], ids: list[int]) -> list[int]:
    return ids if not bos or ids[:1] == bos else bos + ids
