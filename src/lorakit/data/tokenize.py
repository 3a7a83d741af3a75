"""Records -> token ids with the loss on the answer only.

The prompt and the answer are tokenised separately and concatenated, so the boundary between them
is exact (no token straddles it) and the same prompt ids are what generation sees at inference.
A BOS token that the tokenizer adds by itself goes once, at the very start; the answer gets the EOS
token (``add_eos``) so the model learns to stop. ``labels`` are ``-100`` on prompt tokens.

Too long (> ``max_length``): as in the notebook this format comes from (``(prompt + answer + eos)[:MAX_LENGTH]``)
the example is kept and cut, but the prompt first: it is cut (by default from the middle, so its head, e.g.
the instruction's start, and its tail, the "Assistant: " cue right before the answer, survive) down to what
the answer leaves, yet not below half of ``max_length`` while the answer needs more; then the answer's
end is cut so the total fits (without the EOS: the text did not end there). A template whose answer must
stay whole (a classification label: ``answer_truncatable = False``) only has its prompt cut; such an example
is dropped when its answer (+ EOS) cannot fit next to one prompt token.

Records with nothing to train on (a null or blank answer or label, a blank classification text, no
instruction and no input: ``template.empty_fields``) are dropped. Every cut and drop is counted in
:class:`TokenizedDataset` and summed up in one warning each (with the location of an example).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from lorakit.data.examples import TokenizedDataset
from lorakit.data.examples import bos_prefix as _bos_prefix
from lorakit.data.examples import join_bos as _join_bos
from lorakit.data.prompts import PromptTemplate
from lorakit.data.readers import record_location
from lorakit.constants import IGNORE_INDEX
from lorakit.errors import ConfigError, DataError

__all__ = ["TokenizedDataset", "tokenize_records", "encode_prompt", "encode_answer", "IGNORE_INDEX"]

log = logging.getLogger(__name__)

_TRUNCATION = ("middle", "left")


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
    if len(ids) <= room:
        return ids
    if side == "left":
        keep_bos = bos if ids[:1] == bos and room > len(bos) else []
        return keep_bos + ids[len(ids) - (room - len(keep_bos)):]
    head = room // 2
    return ids[:head] + ids[len(ids) - (room - head):]


def _fit(p: list[int], a: list[int], max_length: int, side: str, bos: list[int],
         answer_truncatable: bool) -> tuple[list[int], list[int]] | None:
    """(prompt, answer) cut to fit ``max_length`` together, or None when the example must be dropped."""
    if len(p) + len(a) <= max_length:
        return p, a
    if not answer_truncatable:  # the answer stays whole: only the prompt gives way
        room = max_length - len(a)
        return None if room < 1 else (_cut_prompt(p, room, side, bos), a)
    # the prompt keeps at most what the answer leaves, but at least half of max_length (or all it has)
    prompt_share = min(len(p), max_length - max_length // 2)
    if len(a) <= max_length - prompt_share:
        return _cut_prompt(p, max_length - len(a), side, bos), a
    p = _cut_prompt(p, prompt_share, side, bos)
    return p, a[:max_length - len(p)]  # >= max_length // 2 >= 1 answer tokens; the EOS is among those cut


def _example_location(records: Sequence[dict], i: int) -> str:
    default = records.location(i) if hasattr(records, "location") else f"record {i}"
    return record_location(records[i], default)


def _render_records(records: Sequence[dict], template: PromptTemplate, tokenizer: Any, what: str):
    """``(prompts, answers, kept, locations, empty)``: each record rendered, those with nothing to train on left
    out (their indices in ``empty``, summed up in one warning); a record without the answer field is an error."""
    answer_key = getattr(template, "answer_recipe_key", "data.template_args.output_column")
    empty_fields = getattr(template, "empty_fields", None)
    prompts, answers, kept, locs = [], [], [], []
    empty: list[int] = []
    empty_counts: dict[str, int] = {}
    first_empty = ""
    n_records = 0
    for i, rec in enumerate(records):
        n_records += 1
        loc = _example_location(records, i)
        if template.answer_column not in rec:
            raise DataError(f"{loc}: no answer field {template.answer_column!r} to train on; fields there: "
                            f"{list(rec)}. Name the answer column in the template (recipe: {answer_key}) "
                            "or fix the data.")
        try:
            p, a = template.render(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{loc}: {e}") from None
        missing = list(empty_fields(rec)) if empty_fields is not None else []
        if not missing and not a.strip():
            missing = [repr(template.answer_column)]
        if missing:
            empty.append(i)
            for m in missing:
                empty_counts[m] = empty_counts.get(m, 0) + 1
            first_empty = first_empty or f"{loc} ({', '.join(missing)})"
            continue
        prompts.append(p)
        answers.append(a)
        kept.append(i)
        locs.append(loc)
    if not n_records:
        raise DataError("no records to tokenize; the dataset is empty.")
    if empty:
        counts = ", ".join(f"{k} x{n}" for k, n in empty_counts.items())
        log.warning("%s: dropped %d of %d records with nothing to train on (null or blank: %s), e.g. %s; "
                    "fill those fields in or remove the records", what, len(empty), n_records, counts, first_empty)
    return prompts, answers, kept, locs, empty


def tokenize_records(records: Sequence[dict], template: PromptTemplate, tokenizer: Any, max_length: int, *,
                     add_eos: bool = True, truncation: str = "middle", name: str = "") -> TokenizedDataset:
    """Render each record with ``template`` and tokenise it for causal-LM training (loss on the answer).

    Every record must have the template's answer field (``template.answer_column``); records where it (or
    another field the template needs, see ``empty_fields``) is null or blank are dropped with a warning.
    ``truncation``: how a too-long prompt is cut, ``"middle"`` (default; keep the prompt's head and tail)
    or ``"left"`` (keep BOS and the tail); a too-long answer then loses its end (see the module doc).
    ``name`` (e.g. "train", "eval") goes into the warnings, to say which split they are about.
    Conversation records (the ``chat`` template, see ``ChatTemplate.is_conversation``) take the multi-turn
    path of :mod:`lorakit.data.chat`: loss on every assistant reply, whole turns cut when too long.
    """
    what = f"tokenize {name}" if name else "tokenize"
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}.")
    if truncation not in _TRUNCATION:
        raise ConfigError(f"truncation must be one of {_TRUNCATION}, got {truncation!r}.")
    if getattr(template, "is_conversation", None) is not None and template.is_conversation(records):
        from lorakit.data.chat import tokenize_conversations

        return tokenize_conversations(records, template, tokenizer, max_length, name=name)
    prompts, answers, kept, locs, empty = _render_records(records, template, tokenizer, what)
    n_records = len(records)

    bos = _bos_prefix(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompts)
    answer_ids = encode_answer(tokenizer, answers, add_eos=add_eos)
    truncatable = getattr(template, "answer_truncatable", True)
    examples, too_long, n_truncated, n_answer_cut = [], [], 0, 0
    for j, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if not a:  # an answer with no tokens and no EOS: nothing to learn
            empty.append(kept[j])
            continue
        fitted = _fit(p, a, max_length, truncation, bos, truncatable)
        if fitted is None:
            too_long.append(j)
            continue
        p2, a2 = fitted
        if len(p2) + len(a2) < len(p) + len(a):
            n_truncated += 1
            n_answer_cut += len(a2) < len(a)
        examples.append({"input_ids": p2 + a2, "labels": [IGNORE_INDEX] * len(p2) + a2})

    if n_truncated or too_long:
        log.warning("%s: %d of %d examples truncated to fit max_length=%d (%d with the answer's end cut, "
                    "no EOS); %d dropped (the whole answer must fit and cannot)%s", what, n_truncated, len(prompts),
                    max_length, n_answer_cut, len(too_long), f", e.g. {locs[too_long[0]]}" if too_long else "")
    dropped = sorted(empty + [kept[j] for j in too_long])
    if not examples:
        raise DataError(f"all {n_records} examples were dropped: {len(empty)} with nothing to train on (a null or "
                        f"blank answer, text or instruction), {len(too_long)} whose answer cannot fit in "
                        f"max_length={max_length}; fill in the data, or raise max_length (recipe: data.max_length).")
    return TokenizedDataset(examples, n_truncated=n_truncated, n_dropped=len(dropped), dropped=dropped,
                            n_answer_truncated=n_answer_cut, n_empty=len(empty))
