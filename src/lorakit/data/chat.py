"""Multi-turn conversations -> token ids with the loss on every assistant reply, and only there.

The conversation is rendered with the tokenizer's own chat template (``apply_chat_template``) and
tokenised as one text, so the ids are those the model sees at inference. Which characters are replies is
read from the rendered text itself, for any template: for the assistant turn ``k``,

* ``before`` = the turns before it rendered with the generation prompt (what the model is given), and
* ``through`` = the turns up to and including it rendered without;

when the renderings grow as prefixes of one another (ChatML, Llama-3, Gemma, Mistral ``[INST]``, templates
that insert a default system prompt, ...), the reply is ``through[len(before):]`` with trailing whitespace
removed: the reply's text *and* the template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``, ``</s>``), so the model learns to stop. Everything else (system and user turns, the
template's scaffolding before each reply, the newline after the marker) is masked with ``IGNORE_INDEX``.
A template whose renderings do not grow as prefixes (e.g. one that moves the system prompt into the last
user turn) falls back to finding each turn's text in order in the full rendering, the reply's end-of-turn
marker included. A token that straddles a reply's edge counts as the reply's.

Too long for ``max_length``: whole user/assistant exchanges are cut from the start (the system turn kept),
never a turn in half; a conversation whose last exchange alone does not fit is dropped. Both counted, one
warning each per split.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from lorakit.constants import IGNORE_INDEX
from lorakit.data.conversations import Turn, find_conversation_column, read_conversation
from lorakit.data.examples import TokenizedDataset, bos_prefix
from lorakit.data.readers import record_location
from lorakit.errors import DataError

__all__ = ["render_turns", "assistant_spans", "encode_with_spans", "conversation_of", "tokenize_conversations"]

log = logging.getLogger(__name__)

Span = tuple[int, int]


def render_turns(tokenizer: Any, turns: Sequence[Turn], *, generation_prompt: bool = False) -> str:
    """The chat template's text for ``turns`` (a jinja error becomes a :class:`DataError`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the 'chat' template renders conversations with the tokenizer's chat template, but this "
                        "tokenizer has none; use a chat model's tokenizer (e.g. model embedded), or give the "
                        "tokenizer a template (tokenizer.chat_template = '...').")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([t.message() for t in turns], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise DataError(f"the tokenizer's chat template refuses this conversation: {e}; fix the conversation "
                        "(e.g. a template without a system role) or use another model's template.") from None


def assistant_spans(tokenizer: Any, turns: Sequence[Turn]) -> tuple[str, list[Span]]:
    """``(text, spans)``: the rendered conversation and the character spans of its trained replies."""
    full = render_turns(tokenizer, turns)
    spans, replies = [], []
    for k, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = render_turns(tokenizer, turns[:k], generation_prompt=True)
        through = render_turns(tokenizer, turns[:k + 1])
        reply = through[len(before):].rstrip() if through.startswith(before) else None
        replies.append((turn, before, through, reply))
    if all(r is not None and full.startswith(through) for _, _, through, r in replies):
        spans = [(len(before), len(before) + len(reply)) for turn, before, _, reply in replies if turn.trained]
    else:
        spans = _spans_by_content(full, turns, [(t, through) for t, _, through, _ in replies])
    if not spans or any(end <= start for start, end in spans):
        raise DataError("the tokenizer's chat template renders an assistant reply as no text, so there is nothing "
                        "to train on; check the template.")
    return full, spans


def _spans_by_content(full: str, turns: Sequence[Turn], rendered: list[tuple[Turn, str]]) -> list[Span]:
    """Fallback: each user and assistant turn's text found in order in ``full``; a reply's span runs on
    over the end-of-turn marker that its own rendering (``through``) puts after it. System turns are not
    looked for: some templates move them (e.g. into the last user turn)."""
    markers = {id(t): _end_marker(t, through) for t, through in rendered}
    spans, cursor = [], 0
    for k, turn in enumerate(turns):
        text = turn.content.strip()
        if turn.role == "system" or not text:
            continue
        start = full.find(text, cursor)
        if start < 0:
            raise DataError(f"turn {k}'s text is not in the chat template's rendering of the conversation, so its "
                            "reply cannot be located; this template rewrites messages, use another one.")
        end = start + len(text)
        if turn.role == "assistant":
            marker = markers[id(turn)]
            end += len(marker) if full.startswith(marker, end) else 0
            if turn.trained:
                spans.append((start, end))
        cursor = end
    return spans


def _end_marker(turn: Turn, through: str) -> str:
    """What the template writes right after the reply's text when the reply is last (e.g. ``<|im_end|>``)."""
    text = turn.content.strip()
    at = through.rfind(text) if text else -1
    return through[at + len(text):].rstrip() if at >= 0 else ""


def encode_with_spans(tokenizer: Any, text: str, spans: Sequence[Span], bos: list[int]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``text``: labels are the ids on tokens that overlap a span, else IGNORE_INDEX.
    ``bos``: the BOS the tokenizer would add by itself, put first unless the template wrote it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        inside = any((a < end and b > start) or (a == b and start <= a < end) for start, end in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    if bos and ids[:1] != bos:
        ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
    return ids, labels


def conversation_of(record: dict, template: Any, where: str) -> tuple[list[Turn], str | None]:
    """The record's checked turns (with the template's ``system`` message when it has none) and why it has
    nothing to train on (None when it has something); see :mod:`lorakit.data.conversations`."""
    wanted = getattr(template, "messages_column", None)
    column = find_conversation_column(record, wanted)
    if column is None:
        named = repr(wanted) if wanted else "'messages' or 'conversations'"
        raise DataError(f"{where}: no conversation column {named}; fields there: {list(record)}. Name the column "
                        "(recipe: data.template_args.messages_column) or fix the data.")
    turns, why = read_conversation(record[column], f"{where} column {column!r}")
    system = getattr(template, "system", None)
    if system is not None and turns and turns[0].role != "system":
        turns = [Turn("system", system)] + turns
    return turns, why


def _fit(tokenizer: Any, turns: list[Turn], max_length: int, bos: list[int]) -> tuple[list[int], list[int], int] | None:
    """``(input_ids, labels, exchanges cut)`` within ``max_length``, or None when even the last exchange is too long.
    Whole user/assistant exchanges go from the start; the system turn stays."""
    while turns and turns[-1].role == "user":  # a question with no reply: nothing to learn from it
        turns = turns[:-1]
    head = turns[:1] if turns[0].role == "system" else []
    rest = turns[len(head):]
    for cut in range(0, len(rest) // 2):
        kept = head + rest[2 * cut:]
        if not any(t.role == "assistant" and t.trained for t in kept):
            return None
        text = render_turns(tokenizer, kept)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_length:
            continue  # a cheap first look, without the replies located
        ids, labels = encode_with_spans(tokenizer, *assistant_spans(tokenizer, kept), bos)
        if len(ids) <= max_length:
            return ids, labels, cut
    return None


def tokenize_conversations(records: Sequence[dict], template: Any, tokenizer: Any, max_length: int, *,
                           name: str = "") -> TokenizedDataset:
    """The ``chat`` template's path for conversation records; returns a :class:`TokenizedDataset` whose
    ``n_truncated`` counts conversations that lost turns (``n_turns_cut`` the exchanges cut in all)."""
    what = f"tokenize {name}" if name else "tokenize"
    if not len(records):
        raise DataError("no records to tokenize; the dataset is empty.")
    bos = bos_prefix(tokenizer)
    examples, empty, too_long, reasons, first = [], [], [], {}, {}
    n_cut_convs = n_cut_turns = 0
    for i, rec in enumerate(records):
        loc = _location(records, i)
        try:
            turns, why = conversation_of(rec, template, loc)
            fitted = None if why else _fit(tokenizer, turns, max_length, bos)
        except DataError as e:
            raise DataError(str(e) if str(e).startswith(loc) else f"{loc}: {e}") from None
        if why:
            empty.append(i)
            reasons[why] = reasons.get(why, 0) + 1
            first.setdefault("empty", f"{loc} ({why})")
        elif fitted is None:
            too_long.append(i)
            first.setdefault("long", loc)
        else:
            ids, labels, cut = fitted
            n_cut_convs += cut > 0
            n_cut_turns += cut
            examples.append({"input_ids": ids, "labels": labels})
    _warn(what, len(records), empty, too_long, reasons, first, n_cut_convs, n_cut_turns, max_length)
    if not examples:
        raise DataError(f"all {len(records)} conversations were dropped: {len(empty)} with nothing to train on, "
                        f"{len(too_long)} whose last exchange does not fit in max_length={max_length}; fix the data "
                        "or raise max_length (recipe: data.max_length).")
    return TokenizedDataset(examples, n_truncated=n_cut_convs, n_dropped=len(empty) + len(too_long),
                            dropped=sorted(empty + too_long), n_empty=len(empty), n_turns_cut=n_cut_turns)


def _location(records: Sequence[dict], i: int) -> str:
    default = records.location(i) if hasattr(records, "location") else f"record {i}"
    return record_location(records[i], default)


def _warn(what: str, n: int, empty: list, too_long: list, reasons: dict, first: dict, n_cut_convs: int,
          n_cut_turns: int, max_length: int) -> None:
    if empty:
        counts = ", ".join(f"{k} x{v}" for k, v in reasons.items())
        log.warning("%s: dropped %d of %d conversations with nothing to train on (%s), e.g. %s; fill those turns in "
                    "or remove the records", what, len(empty), n, counts, first["empty"])
    if n_cut_convs or too_long:
        log.warning("%s: %d of %d conversations were longer than max_length=%d and lost their first turns (%d "
                    "user/assistant exchange(s) cut in all, system turns kept); %d dropped, as even their last "
                    "exchange does not fit%s. Raise max_length (recipe: data.max_length) to keep more.", what,
                    n_cut_convs, n, max_length, n_cut_turns, len(too_long),
                    f", e.g. {first['long']}" if too_long else "")

