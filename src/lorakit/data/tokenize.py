"""Records -> token ids with the loss on the answer only.

The prompt and the answer are tokenised separately and concatenated, so the boundary between them
is exact (no token straddles it) and the same prompt ids are what generation sees at inference.
A BOS token that the tokenizer adds by itself goes once, at the very start; the answer gets the EOS
token (``add_eos``) so the model learns to stop. ``labels`` are ``-100`` on prompt tokens.

Too long (> ``max_length``): the PROMPT is cut, by default from the middle (the head, e.g. the
instruction's start, and the tail right before the answer survive), so the answer is kept whole.
An example whose answer (+ EOS) cannot fit next to at least one prompt token is dropped. Both
are counted in :class:`TokenizedDataset` and logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from lorakit.data.prompts import PromptTemplate
from lorakit.errors import ConfigError, DataError

__all__ = ["TokenizedDataset", "tokenize_records", "encode_prompt", "encode_answer", "IGNORE_INDEX"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy (and transformers' loss) skips
_TRUNCATION = ("middle", "left")


@dataclass
class TokenizedDataset:
    """Tokenised examples ``{"input_ids": [...], "labels": [...]}`` plus what happened on the way.

    ``n_truncated``: examples whose prompt was shortened to fit ``max_length``;
    ``n_dropped``: examples left out (answer could not fit, or nothing to learn);
    ``dropped``: the record indices that were left out. Indexable, so a DataLoader can take it as is.
    """

    examples: list[dict]
    n_truncated: int = 0
    n_dropped: int = 0
    dropped: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)

    @property
    def n_answer_tokens(self) -> int:
        return sum(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in self.examples)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds a BOS by itself (add_special_tokens=True), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def _join_bos(bos: list[int], ids: list[int]) -> list[int]:
    return ids if not bos or ids[:1] == bos else bos + ids


def encode_prompt(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids exactly as training builds them (BOS once at the start, no EOS)."""
    bos = _bos_prefix(tokenizer)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    return [_join_bos(bos, list(x)) for x in ids]


def encode_answer(tokenizer: Any, answers: Sequence[str], *, add_eos: bool = True) -> list[list[int]]:
    """Answer ids (no special tokens added) + EOS unless the answer already ends with it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ConfigError("add_eos=True but the tokenizer has no eos_token_id; set tokenizer.eos_token "
                          "or pass add_eos=False.")
    out = []
    for x in (tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers else []):
        x = list(x)
        if add_eos and (not x or x[-1] != eos):
            x.append(eos)
        out.append(x)
    return out


def _cut_prompt(ids: list[int], room: int, side: str, bos: list[int]) -> list[int]:
    if side == "left":
        keep_bos = bos if ids[:1] == bos and room > len(bos) else []
        return keep_bos + ids[len(ids) - (room - len(keep_bos)):]
    head = room // 2
    return ids[:head] + ids[len(ids) - (room - head):]


def tokenize_records(records: Sequence[dict], template: PromptTemplate, tokenizer: Any, max_length: int, *,
                     add_eos: bool = True, truncation: str = "middle") -> TokenizedDataset:
    """Render each record with ``template`` and tokenise it for causal-LM training (loss on the answer).

    Every record must have the template's answer field (``template.answer_column``). ``truncation``:
    ``"middle"`` (default; keep the prompt's head and tail) or ``"left"`` (keep BOS and the tail).
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}.")
    if truncation not in _TRUNCATION:
        raise ConfigError(f"truncation must be one of {_TRUNCATION}, got {truncation!r}.")
    locate = getattr(records, "location", lambda i: f"record {i}")
    prompts, answers = [], []
    for i, rec in enumerate(records):
        if template.answer_column not in rec:
            raise DataError(f"{locate(i)}: no answer field {template.answer_column!r} to train on; fields "
                            f"there: {list(rec)}. Name the answer column in the template or fix the data.")
        try:
            p, a = template.render(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{locate(i)}: {e}") from None
        prompts.append(p)
        answers.append(a)
    if not prompts:
        raise DataError("no records to tokenize; the dataset is empty.")

    bos = _bos_prefix(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompts)
    answer_ids = encode_answer(tokenizer, answers, add_eos=add_eos)
    examples, dropped, n_truncated = [], [], 0
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if not a:  # empty answer and no EOS: nothing to learn
            dropped.append(i)
            continue
        if len(p) + len(a) > max_length:
            room = max_length - len(a)
            if room < 1:
                dropped.append(i)
                continue
            p = _cut_prompt(p, room, truncation, bos)
            n_truncated += 1
        examples.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})

    if n_truncated or dropped:
        log.warning("tokenize: %d of %d examples had their prompt truncated to fit max_length=%d; %d dropped "
                    "(answer too long or empty)%s", n_truncated, len(prompts), max_length, len(dropped),
                    f", e.g. {locate(dropped[0])}" if dropped else "")
    if not examples:
        raise DataError(f"all {len(prompts)} examples were dropped: no answer fits in max_length={max_length} "
                        "(or every answer is empty); raise max_length.")
    return TokenizedDataset(examples, n_truncated=n_truncated, n_dropped=len(dropped), dropped=dropped)
